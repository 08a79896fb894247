"""Run a VM's vCPUs: one thread per vCPU looping in KVM_RUN, stopped and resumed together.

Runs in: the process that owns the VM (the owner rule, ARCHITECTURE.md section 3), on any
thread; :class:`VcpuRunner` serialises its own calls. The vCPU threads are its own.

Downtime starts when the source's last vCPU is out of KVM_RUN and ends when the
destination's last vCPU is back in it, so :meth:`VcpuRunner.stop` and
:meth:`VcpuRunner.resume` wait for every vCPU thread and answer the
``time.monotonic_ns()`` of the last one. A resume wakes every thread to an entry barrier
while no vCPU is in the guest yet, then releases them all into KVM_RUN: otherwise, with
busy guests, the first vCPUs back in the guest take the host's CPUs and the others wait
for a time slice even to wake up. The vCPU threads are SCHED_BATCH (no wakeup
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
is one futex broadcast; the GIL is released while it waits), and *ctypes*, the fallback:
a Python thread per vCPU calling KVM_RUN through ctypes. The fallback installs a Python
handler for the kick signal, which Python allows only on the main thread: the first
ctypes runner of a process must be made there.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno as errno_codes
import mmap
import os
import signal
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from time import monotonic_ns
from types import FrameType, ModuleType, TracebackType
from typing import Protocol

from devstate.devices.kvm import uapi
from devstate.devices.kvm.engine import ENGINE_VARIABLE, EngineName, engine_name, native_module
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

# struct kvm_run (linux/kvm.h): what the runner reads and writes of it.
_IMMEDIATE_EXIT = 1  # u8
_EXIT_REASON = struct.Struct("=I")  # at 8
_UNION = 32  # the exit's details
SNAPSHOT_BYTES = _UNION + 256  # header and exit union: what a fault keeps (_run.c too)
_IO = struct.Struct("=BBHIQ")  # direction (0 in, 1 out), size, port, count, data_offset
_MMIO = struct.Struct("=Q8sIB")  # phys_addr, data, len, is_write
_FAIL_ENTRY = struct.Struct("=QI")  # hardware_entry_failure_reason, cpu
_INTERNAL = struct.Struct("=II")  # suberror, ndata
_SUBERRORS = {1: "instruction emulation failed", 2: "an exception while delivering one",
              3: "event delivery failed", 4: "an exit reason KVM does not handle"}


class ExitReason(enum.IntEnum):
    """``KVM_EXIT_*``: why KVM_RUN returned (those an x86 VM can see)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37


@dataclass(frozen=True, slots=True)
class VcpuFault:
    """How a vCPU's KVM_RUN ended where the runner could not go on: ``errno`` if the ioctl
    failed, else ``reason`` (a ``KVM_EXIT_*`` number) and ``detail`` in words."""

    vcpu_id: int
    errno: int
    reason: int
    detail: str

    @classmethod
    def of(cls, vcpu_id: int, err: int, snapshot: bytes) -> VcpuFault:
        """The fault from KVM_RUN's errno and its ``kvm_run`` at the time."""
        reason = _EXIT_REASON.unpack_from(snapshot, 8)[0]
        return cls(vcpu_id, err, 0 if err else reason, "" if err else _describe(reason, snapshot))

    @property
    def device(self) -> str:
        """The vCPU's device id, ``cpu/N``."""
        return f"cpu/{self.vcpu_id}"

    def error(self) -> DeviceError:
        """The fault as the error a caller gets."""
        if self.errno:
            return KvmError(self.device, "KVM_RUN", self.errno)
        return DeviceError(self.device, f"KVM_RUN exited with {self.detail}")


def _describe(reason: int, snapshot: bytes) -> str:
    try:
        name = ExitReason(reason).name
    except ValueError:
        return f"exit reason {reason}, which the runner does not know"
    if reason == ExitReason.SHUTDOWN:
        return f"{name}: the guest triple-faulted (or asked for a shutdown)"
    if reason == ExitReason.IO:
        direction, size, port, count, _ = _IO.unpack_from(snapshot, _UNION)
        way = "out to" if direction else "in from"
        return (f"{name}: {count} x {size}-byte {way} port {port:#x}, which no device of "
                "this VM handles")
    if reason == ExitReason.MMIO:
        address, _, length, is_write = _MMIO.unpack_from(snapshot, _UNION)
        way = "write" if is_write else "read"
        return (f"{name}: a {length}-byte {way} at guest-physical {address:#x}, outside the "
                "guest's RAM")
    if reason == ExitReason.INTERNAL_ERROR:
        suberror, _ = _INTERNAL.unpack_from(snapshot, _UNION)
        return f"{name}: {_SUBERRORS.get(suberror, f'suberror {suberror}')}"
    if reason == ExitReason.FAIL_ENTRY:
        why, cpu = _FAIL_ENTRY.unpack_from(snapshot, _UNION)
        return f"{name}: hardware entry failure reason {why:#x} on host CPU {cpu}"
    return name


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
    def resume(self, timeout: float, /) -> tuple[int, list[int]]: ...
    def faults(self) -> list[tuple[int, int, bytes]]: ...
    def close(self) -> None: ...


def _kick_noop(signum: int, frame: FrameType | None) -> None:
    """The kick's Python handler: its work is done once KVM_RUN returned EINTR."""


def _install_python_kick(signum: int) -> None:
    current = signal.getsignal(signum)
    if current is _kick_noop or current is None:  # None: a handler not from Python, as good
        return
    if current not in (signal.SIG_DFL, signal.SIG_IGN):
        raise DeviceError("kvm", f"signal {signum} already has a Python handler, and the "
                                 "vCPU runner kicks its threads with it")
    if threading.current_thread() is not threading.main_thread():
        raise DeviceError("kvm", f"the ctypes vCPU runner needs a handler for signal {signum}"
                                 ", and Python installs one only from the main thread: make "
                                 "the process's first ctypes runner there")
    signal.signal(signum, _kick_noop)


class _Phase(enum.Enum):
    RUN = "run"
    STOP = "stop"
    CLOSE = "close"


class _ThreadEngine:
    """The fallback: one Python thread per vCPU calling KVM_RUN through ctypes (the GIL is
    released for the call). Mirrors _run.c's protocol with a lock and two conditions."""

    def __init__(self, fds: Sequence[int], ids: Sequence[int], map_bytes: int,
                 signum: int) -> None:
        _install_python_kick(signum)
        self._fds, self._ids, self._signum, n = list(fds), list(ids), signum, len(fds)
        self._runs: list[mmap.mmap] = []
        try:
            self._runs += (mmap.mmap(fd, map_bytes) for fd in fds)
        except OSError:
            self._close_runs()
            raise
        for run in self._runs:
            run[_IMMEDIATE_EXIT] = 0  # an earlier runner closed with it set
        self._lock = threading.Lock()
        self._go = threading.Condition(self._lock)  # the generation moved
        self._released_cond = threading.Condition(self._lock)  # the entry barrier opened
        self._arrived = threading.Condition(self._lock)  # the last thread parked or entered
        self._phase, self._generation, self._released = _Phase.STOP, 1, 0
        self._parked_count = self._entered_count = 0
        self._parked, self._entered_gen = [False] * n, [0] * n
        self._park_ns, self._enter_ns = [0] * n, [0] * n
        self._faults: dict[int, tuple[int, bytes]] = {}
        self._threads: list[threading.Thread] = []

    def start(self, paused: bool, timeout: float, /) -> tuple[int, list[int]]:
        self._phase = _Phase.STOP if paused else _Phase.RUN
        self._released = 0
        try:
            for i in range(len(self._fds)):
                # Daemon: a process that exits without closing its runner must not wait
                # forever for threads in KVM_RUN (interpreter shutdown joins the others).
                thread = threading.Thread(target=self._main, args=(i,), daemon=True,
                                          name=f"vcpu/{self._ids[i]}")
                thread.start()
                self._threads.append(thread)
        except BaseException as exc:
            self.close()
            if isinstance(exc, RuntimeError):  # threading's "can't start new thread"
                raise OSError(errno_codes.EAGAIN, os.strerror(errno_codes.EAGAIN)) from exc
            raise
        return self._wait(paused, timeout) if paused else self._release(timeout)

    def _main(self, i: int) -> None:
        with contextlib.suppress(OSError):  # best effort, as in _run.c: see the docstring
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: this thread
        generation = 1
        while True:
            if self._phase is _Phase.RUN and self._enter_together(i, generation):
                self._run_until_stopped(i)
            with self._lock:
                self._parked[i], self._park_ns[i] = True, monotonic_ns()
                self._parked_count += 1
                if self._parked_count == len(self._fds):
                    self._arrived.notify_all()
                while self._generation == generation:
                    self._go.wait()
                generation, self._parked[i] = self._generation, False
                if self._phase is _Phase.CLOSE:
                    return

    def _enter_together(self, i: int, generation: int) -> bool:
        """Arrive at the entry barrier; True once the controller released it, False if a
        stop or close came first."""
        with self._lock:
            self._entered_gen[i], self._enter_ns[i] = generation, monotonic_ns()
            self._entered_count += 1
            if self._entered_count == len(self._fds):
                self._arrived.notify_all()
            while self._released != generation and self._phase is _Phase.RUN:
                self._released_cond.wait()
            return self._released == generation

    def _run_until_stopped(self, i: int) -> None:
        fd, run = self._fds[i], self._runs[i]
        while self._phase is _Phase.RUN:
            failed = uapi.libc.ioctl(fd, Ioctl.KVM_RUN, None) < 0
            err = ctypes.get_errno() if failed else 0
            if err == errno_codes.EINTR or (
                    not failed and _EXIT_REASON.unpack_from(run, 8)[0] == ExitReason.INTR):
                continue  # a kick, or immediate_exit: look at the phase again
            with self._lock:
                self._faults[i] = (err, run[:SNAPSHOT_BYTES])
            return

    def _kick(self) -> None:
        """Every thread out of the entry barrier and out of KVM_RUN (the phase is no
        longer RUN)."""
        with self._lock:
            self._released = 0
            self._released_cond.notify_all()
        for i, (run, thread) in enumerate(zip(self._runs, self._threads, strict=False)):
            run[_IMMEDIATE_EXIT] = 1
            if not self._parked[i] and thread.ident is not None:
                signal.pthread_kill(thread.ident, self._signum)

    def _wait(self, stopping: bool, timeout: float) -> tuple[int, list[int]]:
        with self._lock:
            n = len(self._fds)
            self._arrived.wait_for(lambda: (self._parked_count if stopping
                                            else self._entered_count) >= n, timeout)
            if stopping:
                return max(self._park_ns), [i for i in range(n) if not self._parked[i]]
            return max(self._enter_ns), [i for i in range(n)
                                         if self._entered_gen[i] != self._generation]

    def stop(self, timeout: float, /) -> tuple[int, list[int]]:
        self._phase = _Phase.STOP
        self._kick()
        return self._wait(True, timeout)

    def resume(self, timeout: float, /) -> tuple[int, list[int]]:
        with self._lock:
            if not all(self._parked) or self._faults:
                raise ValueError("a vCPU thread is not parked, or faulted")
            self._parked_count = self._entered_count = 0
            for run in self._runs:
                run[_IMMEDIATE_EXIT] = 0
            self._phase = _Phase.RUN
            self._generation += 1
            self._go.notify_all()
        return self._release(timeout)

    def _release(self, timeout: float) -> tuple[int, list[int]]:
        """Once every thread arrived at the entry barrier, release them into KVM_RUN."""
        ns, late = self._wait(False, timeout)
        if not late:
            with self._lock:
                self._released = self._generation
                self._released_cond.notify_all()
        return ns, late

    def faults(self) -> list[tuple[int, int, bytes]]:
        with self._lock:
            return [(i, err, snapshot) for i, (err, snapshot) in sorted(self._faults.items())]

    def close(self) -> None:
        self._phase = _Phase.CLOSE
        self._kick()
        with self._lock:
            self._generation += 1
            self._go.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self._close_runs()

    def _close_runs(self) -> None:
        for run in self._runs:
            run.close()
        self._runs.clear()


# ------------------------------------------------------------------------------- runner


class RunnerState(enum.Enum):
    """Where a :class:`VcpuRunner` is."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"
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
                self._engine = _ThreadEngine(fds, self._ids, map_bytes, KICK_SIGNAL)
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
                self._expect("stop", RunnerState.RUNNING)
                ns, late = self._engine.stop(self._timeout)
                self._stopped_ns = self._arrived("stop", ns, late, RunnerState.STOPPED)
            self._raise_faults()
            return self._stopped_ns

    def resume(self) -> int:
        """Send every vCPU back into KVM_RUN; return when the last one acknowledged, which
        releases them all into it (monotonic ns). Refuses (the first :class:`VcpuFault`, as a
        :class:`DeviceError`) if a vCPU faulted. Running already: returns the same time."""
        with self._lock:
            self._check_owner("resume")
            if self._state is not RunnerState.RUNNING:
                self._expect("resume", RunnerState.STOPPED)
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

    def _expect(self, op: str, state: RunnerState) -> None:
        if self._state is not state:
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
