"""The run engine's fallback: one Python thread per vCPU calling ``KVM_RUN`` through ctypes,
kicked out of it by a signal whose handler Python installs (from the main thread only).

Runs in: the VM's owner, when the C extension ``_run`` is not built or not wanted
(:func:`.run.run_engine_name`). Mirrors ``_run.c``'s protocol with a lock and conditions.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno as errno_codes
import mmap
import os
import signal
import threading
from collections.abc import Sequence
from time import monotonic_ns
from types import FrameType

from devstate.devices.kvm import uapi
from devstate.devices.kvm.exits import EXIT_REASON, IMMEDIATE_EXIT, SNAPSHOT_BYTES, ExitReason
from devstate.devices.kvm.uapi import Ioctl
from devstate.errors import DeviceError


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


class ThreadEngine:
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
            run[IMMEDIATE_EXIT] = 0  # an earlier runner closed with it set
        self._lock = threading.Lock()
        self._go = threading.Condition(self._lock)  # the generation moved
        self._released_cond = threading.Condition(self._lock)  # the entry barrier opened
        self._arrived = threading.Condition(self._lock)  # the last thread parked or entered
        self._phase, self._generation, self._released = _Phase.STOP, 1, 0
        self._armed = False  # woken to the entry barrier by arm(), not released yet
        self._released_ns = 0
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
                    not failed and EXIT_REASON.unpack_from(run, 8)[0] == ExitReason.INTR):
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
            run[IMMEDIATE_EXIT] = 1
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
        self._armed = False
        self._phase = _Phase.STOP
        self._kick()
        return self._wait(True, timeout)

    def arm(self) -> None:
        with self._lock:
            if not all(self._parked) or self._faults:
                raise ValueError("a vCPU thread is not parked, or faulted")
            self._parked_count = self._entered_count = 0
            for run in self._runs:
                run[IMMEDIATE_EXIT] = 0
            self._phase = _Phase.RUN
            self._generation += 1
            self._go.notify_all()
        self._armed = True

    def resume(self, timeout: float, /) -> tuple[int, list[int]]:
        if not self._armed:
            self.arm()
        self._armed = False
        ns, late = self._release(timeout)
        return (ns if late else self._released_ns), late

    def _release(self, timeout: float) -> tuple[int, list[int]]:
        """Once every thread arrived at the entry barrier, release them into KVM_RUN."""
        ns, late = self._wait(False, timeout)
        if not late:
            with self._lock:
                self._released_ns = monotonic_ns()
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
