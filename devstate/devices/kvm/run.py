"""Run a VM's vCPUs: one thread per vCPU looping in KVM_RUN, stopped and resumed together.

Runs in: the process that owns the VM (the owner rule, ARCHITECTURE.md section 3), on any
thread; :class:`VcpuRunner` serialises its own calls. The vCPU threads are its own.

Downtime starts when the source's last vCPU is out of KVM_RUN and ends when the
destination's vCPUs are released back into it, so :meth:`VcpuRunner.stop` waits for every
vCPU thread and answers the ``time.monotonic_ns()`` of the last one, and
:meth:`VcpuRunner.resume` answers when it released them. A resume wakes every thread to
an entry barrier while no vCPU is in the guest yet, then releases them all into KVM_RUN:
otherwise, with busy guests, the first vCPUs back in the guest take the host's CPUs and
the others wait for a time slice even to wake up. :meth:`VcpuRunner.arm` does the
wake-up alone, ahead: a destination arms before its load (armed threads touch no vCPU),
and its resume after the commit only releases them. The vCPU threads are SCHED_BATCH (no wakeup
preemption), so that the owner's own threads are not starved while the host's CPUs are
overcommitted (_run.c has the reasons and the figures).

Between a stop and the next resume no thread of the runner touches its vCPU: the pool's
threads may issue the vCPUs' KVM_GET_* and KVM_SET_* (a vCPU's ioctls serialise on its
mutex, so a thread still in KVM_RUN would block them).

How a vCPU is stopped: its ``kvm_run.immediate_exit`` is set (KVM then refuses to enter
the guest, answering EINTR) and its thread is sent :data:`KICK_SIGNAL`, whose handler does
nothing, so a KVM_RUN in progress returns EINTR (or KVM_EXIT_INTR). immediate_exit covers
a kick that lands before the thread is in KVM_RUN; resume clears it.

Any other end of KVM_RUN (a triple fault's KVM_EXIT_SHUTDOWN, an IO or MMIO exit no device
here handles, an internal error, a failed entry, an errno) parks that vCPU's thread for good
and is kept as a :class:`VcpuFault`; :meth:`VcpuRunner.stop`, :meth:`VcpuRunner.resume` and
:meth:`VcpuRunner.check` raise it as a :class:`DeviceError` naming ``cpu/N`` and the exit.

Two engines, chosen like :mod:`.engine`'s (``DEVSTATE_KVM_ENGINE``, :class:`EngineName`):
*native*, the C extension :mod:`._run` (pthreads with small stacks, the loop in C, a resume
is one futex broadcast; the GIL is released while it waits), and *ctypes*, the fallback
(:mod:`.run_threads`): a Python thread per vCPU calling KVM_RUN through ctypes. How a
KVM_RUN ended, and a fault in words: :mod:`.exits`. The fallback installs a Python
handler for the kick signal, which Python allows only on the main thread: the first
ctypes runner of a process must be made there.
"""

from __future__ import annotations

import enum
import errno as errno_codes
import os
import signal
import threading
from collections.abc import Sequence
from types import ModuleType, TracebackType
from typing import Protocol

from devstate.devices.kvm import uapi
from devstate.devices.kvm.engine import ENGINE_VARIABLE, EngineName, engine_name, native_module
from devstate.devices.kvm.exits import VcpuFault
from devstate.devices.kvm.run_threads import ThreadEngine
from devstate.devices.kvm.uapi import Cap, Ioctl, KvmError
from devstate.devices.kvm.vcpu import KvmVcpu
from devstate.errors import DeviceError, SpecError

# Firecracker's choice (vcpu.rs: sigrtmin() + VCPU_RTSIG_OFFSET 0). A real-time signal: no
# library in this process claims one (CPython uses none, glibc keeps its own two below
# SIGRTMIN), and kicks to several threads are queued, never merged into one.
KICK_SIGNAL = signal.SIGRTMIN
# How long stop and resume wait for every vCPU thread before naming the late ones: far
# above what 288 vCPUs on two host CPUs take (milliseconds), well below "hung".
WAIT_TIMEOUT_S = 10.0

# ------------------------------------------------------------------------------ engines


def _native() -> ModuleType | None:
    return native_module("_run")


def run_engine_name() -> EngineName:
    """The engine that runs vCPUs in this process: :func:`.engine.engine_name`'s, except
    that where only :mod:`._run` is missing (an older build) and ``DEVSTATE_KVM_ENGINE``
    does not ask for native, the ctypes threads run them."""
    name = engine_name()
    if name is EngineName.NATIVE and _native() is None:
        if os.environ.get(ENGINE_VARIABLE, "").strip():
            raise SpecError(ENGINE_VARIABLE, "native, but the extension "
                                             "devstate.devices.kvm._run was not built "
                                             "(reinstall with a C compiler: README)")
        return EngineName.CTYPES
    return name


class _Engine(Protocol):
    """What both engines do; each call returns (ns, late): the time the last vCPU thread
    got where the call sends them, and the positions of those that did not in time."""

    def start(self, paused: bool, timeout: float, /) -> tuple[int, list[int]]: ...
    def stop(self, timeout: float, /) -> tuple[int, list[int]]: ...
    def arm(self) -> None: ...
    def resume(self, timeout: float, /) -> tuple[int, list[int]]: ...
    def faults(self) -> list[tuple[int, int, bytes]]: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------------------- runner


class RunnerState(enum.Enum):
    """Where a :class:`VcpuRunner` is."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"
    ARMED = "armed"  # stopped, every thread woken to the entry barrier (resume releases)
    BROKEN = "broken"  # a thread could not be started, or did not answer in time
    CLOSED = "closed"


def vcpu_map_bytes() -> int:
    """The size of a vCPU fd's ``kvm_run`` mapping, after checking that KVM honours
    ``immediate_exit`` (without it a kick could be lost: see the module docstring)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise KvmError("kvm", "open /dev/kvm", exc.errno or errno_codes.EIO) from exc
    try:
        if not uapi.ioctl(fd, Ioctl.KVM_CHECK_EXTENSION, Cap.IMMEDIATE_EXIT):
            raise DeviceError("kvm", "KVM lacks KVM_CAP_IMMEDIATE_EXIT: a vCPU could not be "
                                     "stopped reliably")
        return uapi.ioctl(fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE)
    finally:
        os.close(fd)


class VcpuRunner:
    """Runs ``vcpus`` (of one VM, made in this process), one thread each; a context manager.

    ``engine`` defaults to :func:`run_engine_name`; ``timeout`` bounds each wait for the
    vCPU threads (a late thread is an error naming its vCPU, never a hang).
    """

    def __init__(self, vcpus: Sequence[KvmVcpu], *, engine: EngineName | None = None,
                 timeout: float = WAIT_TIMEOUT_S) -> None:
        if not vcpus:
            raise DeviceError("kvm", "a vCPU runner needs at least one vCPU")
        self.engine = engine or run_engine_name()
        self._ids = [v.vcpu_id for v in vcpus]
        self._timeout = timeout
        self._lock = threading.Lock()
        self._state = RunnerState.NEW
        self._stopped_ns = self._resumed_ns = 0
        self._owner = os.getpid()
        fds, map_bytes = [v.fd for v in vcpus], vcpu_map_bytes()
        try:
            if self.engine is EngineName.NATIVE:
                from devstate.devices.kvm import _run
                self._engine: _Engine = _run.Runner(fds, self._ids, map_bytes, KICK_SIGNAL)
            else:
                self._engine = ThreadEngine(fds, self._ids, map_bytes, KICK_SIGNAL)
        except OSError as exc:
            err = exc.errno or errno_codes.EIO
            raise KvmError("kvm", "mmap of the vCPUs' kvm_run", err) from exc

    @property
    def state(self) -> RunnerState:
        """Where the runner is."""
        return self._state

    @property
    def running(self) -> bool:
        """True while the vCPUs are (meant to be) in KVM_RUN."""
        return self._state is RunnerState.RUNNING

    @property
    def faults(self) -> tuple[VcpuFault, ...]:
        """Every vCPU whose KVM_RUN ended in a way the runner does not handle, by vCPU."""
        with self._lock:
            return self._faults()

    def _faults(self) -> tuple[VcpuFault, ...]:
        if self._state is RunnerState.CLOSED or os.getpid() != self._owner:
            return ()
        return tuple(VcpuFault.of(self._ids[at], err, snapshot)
                     for at, err, snapshot in self._engine.faults())

    def start(self, *, paused: bool = False) -> int:
        """Start a thread per vCPU, released into KVM_RUN together (or, ``paused``, parked
        until :meth:`resume`: thread creation then stays off the critical path). Returns
        when the last one got there (monotonic ns)."""
        with self._lock:
            self._check_owner("start")
            self._expect("start", RunnerState.NEW)
            self._state = RunnerState.BROKEN  # until every thread answered
            try:
                ns, late = self._engine.start(paused, self._timeout)
            except OSError as exc:
                raise DeviceError("kvm", f"start: cannot create the vCPU threads: "
                                         f"{exc.strerror}", exc.errno) from exc
            if paused:
                self._stopped_ns = self._arrived("start", ns, late, RunnerState.STOPPED)
            else:
                self._resumed_ns = self._arrived("start", ns, late, RunnerState.RUNNING)
            return ns

    def stop(self) -> int:
        """Get every vCPU out of KVM_RUN; return when the last one acknowledged (monotonic
        ns). From then until :meth:`resume` no runner thread touches a vCPU. Raises the
        first :class:`VcpuFault` as a :class:`DeviceError` (after stopping the others).
        Stopped already: returns the same time again."""
        with self._lock:
            self._check_owner("stop")
            if self._state is not RunnerState.STOPPED:
                self._expect("stop", RunnerState.RUNNING, RunnerState.ARMED)
                ns, late = self._engine.stop(self._timeout)
                self._stopped_ns = self._arrived("stop", ns, late, RunnerState.STOPPED)
            self._raise_faults()
            return self._stopped_ns

    def arm(self) -> None:
        """Wake every stopped vCPU thread to the entry barrier and return at once: the
        threads wait there, touching no vCPU, until :meth:`resume` releases them (it then
        waits for no wake-up) or :meth:`stop` parks them again. Refuses, like
        :meth:`resume`, if a vCPU faulted; armed already: nothing to do."""
        with self._lock:
            self._check_owner("arm")
            if self._state is not RunnerState.ARMED:
                self._expect("arm", RunnerState.STOPPED)
                self._raise_faults()
                self._engine.arm()
                self._state = RunnerState.ARMED

    def resume(self) -> int:
        """Send every vCPU back into KVM_RUN: once every thread arrived at the entry
        barrier, release them all into it; return when they were released (monotonic ns).
        Refuses (the first :class:`VcpuFault`, as a :class:`DeviceError`) if a vCPU
        faulted. Running already: returns the same time."""
        with self._lock:
            self._check_owner("resume")
            if self._state is not RunnerState.RUNNING:
                self._expect("resume", RunnerState.STOPPED, RunnerState.ARMED)
                self._raise_faults()
                ns, late = self._engine.resume(self._timeout)
                self._resumed_ns = self._arrived("resume", ns, late, RunnerState.RUNNING)
            return self._resumed_ns

    def check(self) -> None:
        """Raise the first :class:`VcpuFault` as a :class:`DeviceError`, if there is one."""
        with self._lock:
            self._check_owner("check")
            self._raise_faults()

    def _check_owner(self, op: str) -> None:
        if os.getpid() != self._owner:
            raise DeviceError("kvm", f"{op}: the vCPU runner belongs to process {self._owner}"
                                     " (the owner rule)")

    def _expect(self, op: str, *states: RunnerState) -> None:
        if self._state not in states:
            raise DeviceError("kvm", f"{op}: the vCPU runner is {self._state.value}")

    def _arrived(self, op: str, ns: int, late: list[int], state: RunnerState) -> int:
        """``ns``, once every thread got where ``op`` sent it; else the runner is broken."""
        if late:
            self._state = RunnerState.BROKEN
            more = f" (and {len(late) - 1} more)" if len(late) > 1 else ""
            raise DeviceError(f"cpu/{self._ids[late[0]]}", f"{op}: its thread{more} did not "
                                                           f"answer within {self._timeout} s")
        self._state = state
        return ns

    def _raise_faults(self) -> None:
        faults = self._faults()
        if not faults:
            return
        error = faults[0].error()
        if len(faults) > 1:
            others = ", ".join(f.device for f in faults[1:4])
            error.add_note(f"{len(faults) - 1} more vCPU(s) faulted too ({others}...): "
                           "VcpuRunner.faults has them all")
        raise error

    def close(self) -> None:
        """Stop and join every thread, and unmap every ``kvm_run``. Idempotent; safe after
        a failed start."""
        with self._lock:
            if self._state is RunnerState.CLOSED:
                return
            self._state = RunnerState.CLOSED
            # A forked child has none of the threads, and shares the kvm_run pages with
            # the parent: kicking from here would stop the parent's vCPUs.
            if os.getpid() == self._owner:
                self._engine.close()

    def __enter__(self) -> VcpuRunner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
