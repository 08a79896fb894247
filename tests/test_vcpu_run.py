"""The vCPU run engine (devstate.devices.kvm.run): real vCPUs executing a tiny guest, stopped
and resumed together, on the native engine and on the ctypes threads.

The guest is a few hand-assembled real-mode instructions in 64 KiB of guest RAM (a
:class:`GuestRam` that :meth:`KvmVm.map_ram` puts at guest-physical 0): each vCPU runs one of
the programs below, from CS base 0 with interrupts off. A counting vCPU increments its own
counter in guest RAM, so "it runs" and "it is stopped" are read from memory, not from the
runner.

Tests that need ``/dev/kvm`` skip with the reason when it is missing or cannot be opened;
the fault decoding and engine choice run everywhere.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devstate.devices.kvm import run, structs, uapi
from devstate.devices.kvm.engine import ENGINE_VARIABLE, EngineName
from devstate.devices.kvm.exits import SNAPSHOT_BYTES, ExitReason, VcpuFault
from devstate.devices.kvm.ram import GuestRam
from devstate.devices.kvm.run import KICK_SIGNAL, RunnerState, VcpuRunner, run_engine_name
from devstate.devices.kvm.uapi import Ioctl, KvmError
from devstate.devices.kvm.vcpu import KvmVcpu
from devstate.devices.kvm.vm import KvmVm
from devstate.errors import DeviceError, SpecError
from tests.kvm_access import needs_kvm

NATIVE_BUILT = run._native() is not None

# ------------------------------------------------------------------------ the guest

RAM_BYTES = 0x10000
COUNTERS = 0x1000  # vCPU i's u32 counter is at COUNTERS + 4 * i (rbx points at it)
TSS_ADDR = 0xFFFBD000  # KVM_SET_TSS_ADDR: three pages Intel VMX needs for real mode

# Each program: (guest address, bytes), in 16-bit real mode unless it says otherwise.
COUNT = (0x00, bytes([
    0x66, 0xFF, 0x07,  # 0x00: inc dword [bx]
    0xEB, 0xFB,        # 0x03: jmp 0x00
]))
COUNT_RIPS = {0x00, 0x03}
HALT = (0x10, bytes([
    0xF4,              # 0x10: hlt (the in-kernel LAPIC blocks the vCPU in KVM_RUN)
    0xEB, 0xFD,        # 0x11: jmp 0x10
]))
IO_OUT = (0x20, bytes([
    0xB0, 0x42,        # 0x20: mov al, 0x42
    0xE6, 0xE9,        # 0x22: out 0xe9, al (the Bochs debug port: no device of this VM)
    0xEB, 0xFE,        # 0x24: jmp 0x24
]))
# In 32-bit protected mode (flat segments set through KVM_SET_SREGS) with an empty IDT: #UD
# finds no gate (#GP), nor does the #GP (#DF), nor the #DF: a triple fault.
TRIPLE_FAULT = (0x30, bytes([
    0x0F, 0x0B,        # 0x30: ud2
]))
PROGRAMS = (COUNT, HALT, IO_OUT, TRIPLE_FAULT)


class Guest:
    """A KVM VM of ``n`` vCPUs in 64 KiB of RAM holding every program; vCPU i runs
    ``programs.get(i, default)``."""

    def __init__(self, n: int, default: tuple[int, bytes] = COUNT,
                 programs: dict[int, tuple[int, bytes]] | None = None) -> None:
        self.n = n
        self.ram = GuestRam.create(RAM_BYTES, "test-vcpu-run")
        try:
            self.vm = KvmVm()
        except BaseException:
            self.ram.close()
            raise
        try:
            for at, code in PROGRAMS:
                self.ram.view[at:at + len(code)] = code
            self.vm.map_ram(self.ram)
            uapi.ioctl(self.vm.fd, Ioctl.KVM_SET_TSS_ADDR, TSS_ADDR)
            self.vcpus = [self._vcpu(i, (programs or {}).get(i, default)) for i in range(n)]
        except BaseException:
            self.close()
            raise

    def _vcpu(self, i: int, program: tuple[int, bytes]) -> KvmVcpu:
        vcpu = self.vm.create_vcpu(i)
        sregs = structs.kvm_sregs()
        uapi.ioctl(vcpu.fd, Ioctl.KVM_GET_SREGS, sregs)
        sregs.cs.base = sregs.cs.selector = 0
        if program is TRIPLE_FAULT:
            _flat_protected_mode(sregs)
        uapi.ioctl(vcpu.fd, Ioctl.KVM_SET_SREGS, sregs)
        regs = structs.kvm_regs(rip=program[0], rflags=0x2, rbx=COUNTERS + 4 * i)
        uapi.ioctl(vcpu.fd, Ioctl.KVM_SET_REGS, regs)
        # With the in-kernel irqchip KVM starts APs UNINITIALIZED (waiting for INIT-SIPI).
        uapi.ioctl(vcpu.fd, Ioctl.KVM_SET_MP_STATE,
                   structs.kvm_mp_state(structs.MpState.RUNNABLE))
        return vcpu

    def counters(self) -> tuple[int, ...]:
        """Every vCPU's counter, as the guest left it."""
        return struct.unpack_from(f"<{self.n}I", self.ram.view, COUNTERS)

    def rip(self, i: int) -> int:
        """vCPU i's RIP (KVM_GET_REGS)."""
        regs = structs.kvm_regs()
        uapi.ioctl(self.vcpus[i].fd, Ioctl.KVM_GET_REGS, regs)
        return int(regs.rip)

    def close(self) -> None:
        """The VM first (KVM keeps the RAM's address, not its pages), then the RAM."""
        self.vm.close()
        self.ram.close()


def _flat_protected_mode(sregs: structs.kvm_sregs) -> None:
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        segment = getattr(sregs, name)
        segment.base, segment.limit, segment.g, segment.db = 0, 0xFFFFFFFF, 1, 1
        segment.s, segment.present, segment.dpl = 1, 1, 0
        segment.type = 0xB if name == "cs" else 0x3  # code: execute/read; data: read/write
        segment.selector = 8 if name == "cs" else 16
    sregs.cr0 |= 1  # PE
    sregs.idt.base, sregs.idt.limit = 0, 0


@pytest.fixture
def guest_of() -> Iterator[Callable[..., Guest]]:
    """Make guests (``Guest``'s arguments); every one is closed after the test."""
    made: list[Guest] = []

    def make(*args: Any, **kwargs: Any) -> Guest:
        made.append(Guest(*args, **kwargs))
        return made[-1]

    yield make
    for guest in made:
        guest.close()


@pytest.fixture(params=[
    pytest.param(EngineName.NATIVE, marks=pytest.mark.skipif(
        not NATIVE_BUILT, reason="devstate.devices.kvm._run is not built (pip install -e .)")),
    EngineName.CTYPES])
def engine(request: pytest.FixtureRequest) -> EngineName:
    """Each engine in turn."""
    return EngineName(request.param)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.002)


def all_advance(guest: Guest) -> None:
    """Wait until every vCPU's counter moved."""
    before = guest.counters()
    wait_until(lambda: all(a != b for a, b in zip(guest.counters(), before, strict=True)),
               "every vCPU's counter advancing")


def tasks() -> int:
    """This process's threads, native ones included, less KVM's own: since Linux 6.13 the
    kernel's kvm-nx-lpage-recovery worker is a task of the VM owner's, from the VM's first
    KVM_RUN to its end."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read())
        except FileNotFoundError:
            pass  # ended since the listing
    return sum(1 for name in names if not name.startswith("kvm-"))


def no_more_tasks_than(before: int) -> None:
    """Wait (briefly) for the threads that were joined to leave the kernel's list: Python's
    Thread.join returns when the thread's work ended, just before its OS thread exits."""
    wait_until(lambda: tasks() <= before, f"back to {before} threads", timeout=2.0)


# ------------------------------------------------------------------------- running


@needs_kvm
def test_vcpus_run_only_between_start_and_stop(guest_of: Callable[..., Guest],
                                               engine: EngineName) -> None:
    guest = guest_of(4)
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        assert runner.engine is engine
        assert guest.counters() == (0, 0, 0, 0)
        runner.start()
        assert runner.running
        all_advance(guest)
        stopped = runner.stop()
        assert stopped <= time.monotonic_ns() and not runner.running
        frozen = guest.counters()
        time.sleep(0.05)
        assert guest.counters() == frozen, "a vCPU ran after stop() returned"
        assert runner.stop() == stopped  # stopped already: the same acknowledgement
        resumed = runner.resume()
        assert stopped < resumed <= time.monotonic_ns() and runner.running
        all_advance(guest)
        assert runner.resume() == resumed
    assert runner.state is RunnerState.CLOSED


@needs_kvm
def test_a_stopped_vcpu_answers_other_threads_at_once(guest_of: Callable[..., Guest],
                                                      engine: EngineName) -> None:
    """No runner thread holds a vCPU after stop(): its ioctls from another thread return
    at once (while in KVM_RUN, the vCPU's mutex would hold them until the next kick), and
    its RIP stays where the guest's loop was."""
    guest = guest_of(8)
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        runner.start()
        all_advance(guest)
        runner.stop()
        rips: dict[int, list[int]] = {}

        def read_twice() -> None:
            for i in range(guest.n):
                rips[i] = [guest.rip(i)]
            time.sleep(0.02)
            for i in range(guest.n):
                rips[i].append(guest.rip(i))

        reader = threading.Thread(target=read_twice)
        started = time.monotonic()
        reader.start()
        reader.join(timeout=5.0)
        assert not reader.is_alive(), "KVM_GET_REGS blocked: a runner thread is in KVM_RUN"
        assert time.monotonic() - started < 1.0
        for i, (first, second) in rips.items():
            assert first == second and first in COUNT_RIPS, f"cpu/{i}: RIP {first}, {second}"


@needs_kvm
def test_a_kvm_run_that_comes_after_the_stop_returns_at_once(
        guest_of: Callable[..., Guest], engine: EngineName) -> None:
    """A thread kicked just before it issued KVM_RUN consumed the signal in user space; its
    KVM_RUN must still return at once (immediate_exit), or it would run the guest on
    and stop() would never get its acknowledgement. This KVM_RUN is that late one."""
    guest = guest_of(4)
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        runner.start()
        all_advance(guest)
        runner.stop()
        frozen = guest.counters()
        for vcpu in guest.vcpus:
            late = threading.Thread(target=uapi.libc.ioctl, args=(vcpu.fd, Ioctl.KVM_RUN, None))
            late.start()
            late.join(timeout=2.0)
            if late.is_alive():  # it runs the guest: kick it out before failing
                assert late.ident is not None
                signal.pthread_kill(late.ident, KICK_SIGNAL)
                late.join()
                pytest.fail(f"{vcpu.id}: a KVM_RUN after stop() entered the guest")
        assert guest.counters() == frozen
        runner.resume()
        all_advance(guest)


@needs_kvm
def test_stop_and_resume_many_times(guest_of: Callable[..., Guest],
                                    engine: EngineName) -> None:
    """Most stops come right after the resume, while threads are still on their way into
    KVM_RUN (where a kick alone could land too early); every fifth waits until each vCPU
    ran again."""
    guest = guest_of(64)
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        last = runner.start()
        for round_ in range(40):
            if round_ % 5 == 0:
                all_advance(guest)
            stopped = runner.stop()
            frozen = guest.counters()
            time.sleep(0.002)
            assert guest.counters() == frozen, f"round {round_}: a vCPU ran after stop()"
            resumed = runner.resume()
            assert last < stopped < resumed, f"round {round_}: times out of order"
            last = resumed
        all_advance(guest)


@needs_kvm
def test_a_paused_start_runs_nothing_until_resume(guest_of: Callable[..., Guest],
                                                  engine: EngineName) -> None:
    guest = guest_of(16)
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        parked = runner.start(paused=True)
        assert runner.state is RunnerState.STOPPED and runner.stop() == parked
        time.sleep(0.05)
        assert guest.counters() == (0,) * 16
        assert runner.resume() > parked
        all_advance(guest)


@needs_kvm
def test_armed_threads_wait_for_the_release_and_touch_no_vcpu(
        guest_of: Callable[..., Guest], engine: EngineName) -> None:
    """arm() wakes the threads to the entry barrier and returns: no vCPU runs, and each
    answers another thread's ioctls at once, until resume() releases them; resume then
    answers when it released them, not when they arrived (a destination arms before its
    commit: the wake-ups leave the downtime)."""
    guest = guest_of(16)
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        runner.start(paused=True)
        runner.arm()
        armed = time.monotonic_ns()
        assert runner.state is RunnerState.ARMED and not runner.running
        runner.arm()  # armed already: nothing to do
        time.sleep(0.05)
        assert guest.counters() == (0,) * 16, "a vCPU ran while armed"
        assert {guest.rip(i) for i in range(guest.n)} == {guest.rip(0)}  # never entered
        resumed = runner.resume()
        assert resumed >= armed + 50_000_000 and runner.running
        all_advance(guest)
        with pytest.raises(DeviceError, match="arm: the vCPU runner is running"):
            runner.arm()


@needs_kvm
def test_a_stop_parks_armed_threads_again(guest_of: Callable[..., Guest],
                                          engine: EngineName) -> None:
    """A migration that fails before its commit: the armed threads park again, none ran,
    and a later arm and resume run the guest as usual."""
    guest = guest_of(16)
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        runner.start(paused=True)
        for _ in range(3):
            runner.arm()
            runner.stop()
            assert runner.state is RunnerState.STOPPED
        time.sleep(0.02)
        assert guest.counters() == (0,) * 16
        runner.arm()
        runner.resume()
        all_advance(guest)


@needs_kvm
def test_idle_vcpus_stop_and_resume(guest_of: Callable[..., Guest],
                                    engine: EngineName) -> None:
    """vCPUs halted in the kernel (the common case of a real guest) are kicked out too."""
    guest = guest_of(32, HALT)
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        runner.start()
        for _ in range(5):
            runner.stop()
            assert {guest.rip(i) for i in range(guest.n)} <= {0x10, 0x11}
            runner.resume()


# ------------------------------------------------------------------------ lifecycle


@needs_kvm
def test_close_leaves_no_thread_behind(guest_of: Callable[..., Guest],
                                       engine: EngineName) -> None:
    guest = guest_of(32)
    before = tasks()
    runner = VcpuRunner(guest.vcpus, engine=engine)
    runner.start()
    all_advance(guest)
    assert tasks() == before + 32
    runner.close()
    no_more_tasks_than(before)
    assert not [t for t in threading.enumerate() if t.name.startswith("vcpu/")]
    runner.close()  # idempotent
    with pytest.raises(DeviceError, match="closed"):
        runner.resume()
    # The vCPUs are the caller's again: a new runner runs them.
    with VcpuRunner(guest.vcpus, engine=engine) as again:
        again.start()
        all_advance(guest)
    no_more_tasks_than(before)


@needs_kvm
def test_close_before_start(guest_of: Callable[..., Guest], engine: EngineName) -> None:
    guest = guest_of(2)
    before = tasks()
    with (VcpuRunner(guest.vcpus, engine=engine) as runner,
          pytest.raises(DeviceError, match="stop: the vCPU runner is new")):
        runner.stop()
    no_more_tasks_than(before)
    assert runner.state is RunnerState.CLOSED


@needs_kvm
def test_a_forked_child_leaves_the_runner_alone(guest_of: Callable[..., Guest],
                                                engine: EngineName) -> None:
    """A child forked from the owner has none of the vCPU threads and shares the kvm_run
    pages: it may not drive the runner, and its close() must neither wait for the parent's
    threads nor touch the parent's vCPUs."""
    guest = guest_of(4)
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        runner.start()
        all_advance(guest)
        pid = os.fork()
        if pid == 0:  # whatever happens here, the child leaves through os._exit
            code = 3
            try:
                refused = False
                try:
                    runner.stop()
                except DeviceError as exc:
                    refused = "belongs to process" in str(exc)
                runner.close()
                code = 0 if refused else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while not (ended := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the child's close() hung")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(ended[1]) == 0
        all_advance(guest)
        runner.stop()
        runner.resume()
        all_advance(guest)


# A process where no more threads fit (its address space is limited to a few stacks beyond
# what it uses), so that starting 64 vCPU threads fails part way.
NO_ROOM_FOR_THREADS = textwrap.dedent("""
    import os, resource, sys, time
    from devstate.devices.kvm.engine import EngineName
    from devstate.devices.kvm.run import VcpuRunner
    from devstate.devices.kvm.vm import KvmVm
    from devstate.errors import DeviceError

    with KvmVm() as vm:
        runner = VcpuRunner([vm.create_vcpu(i) for i in range(64)],
                            engine=EngineName(sys.argv[1]))
        before = len(os.listdir("/proc/self/task"))
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
        unlimited = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + (1 << 20), unlimited[1]))
        try:
            runner.start()
        except DeviceError as exc:
            resource.setrlimit(resource.RLIMIT_AS, unlimited)
            print("error:", exc)
        runner.close()
        runner.close()
        deadline = time.monotonic() + 2  # joined Python threads exit just after the join
        while len(os.listdir("/proc/self/task")) > before and time.monotonic() < deadline:
            time.sleep(0.01)
        print("threads:", before, len(os.listdir("/proc/self/task")))
""")


@needs_kvm
def test_threads_that_cannot_be_created_leave_none_behind(engine: EngineName) -> None:
    done = subprocess.run([sys.executable, "-c", NO_ROOM_FOR_THREADS, engine.value],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ("error: kvm: start: cannot create the vCPU threads: "
                        "Resource temporarily unavailable"), done.stdout
    before, after = lines[1].split()[1:]
    assert before == after, "threads left behind after a failed start"


@needs_kvm
def test_a_late_thread_is_an_error_not_a_hang(guest_of: Callable[..., Guest],
                                              engine: EngineName) -> None:
    """A wait that times out names a vCPU and leaves the runner broken, but closable."""
    guest = guest_of(64)
    before = tasks()
    runner = VcpuRunner(guest.vcpus, engine=engine, timeout=0.0)
    try:
        runner.start()
    except DeviceError as exc:
        assert "did not answer within 0.0 s" in str(exc) and str(exc).startswith("cpu/")
        assert runner.state is RunnerState.BROKEN
        with pytest.raises(DeviceError, match="broken"):
            runner.stop()
    else:  # every thread arrived before the first look: nothing was late
        assert runner.running
    runner.close()
    no_more_tasks_than(before)


# --------------------------------------------------------------------------- faults


@needs_kvm
def test_an_io_exit_is_an_error_naming_the_vcpu(guest_of: Callable[..., Guest],
                                                engine: EngineName) -> None:
    guest = guest_of(4, programs={2: IO_OUT})
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        runner.start()
        wait_until(lambda: bool(runner.faults), "the IO exit seen")
        (fault,) = runner.faults
        assert (fault.vcpu_id, fault.reason, fault.errno) == (2, ExitReason.IO, 0)
        expected = "cpu/2: KVM_RUN exited with IO: 1 x 1-byte out to port 0xe9"
        with pytest.raises(DeviceError, match=expected) as raised:
            runner.check()
        assert raised.value.device == "cpu/2"
        counting = [0, 1, 3]
        before = guest.counters()
        wait_until(lambda: all(guest.counters()[i] != before[i] for i in counting),
                   "the other vCPUs running on")
        with pytest.raises(DeviceError, match=expected):
            runner.stop()  # stops the others all the same
        assert runner.state is RunnerState.STOPPED
        frozen = guest.counters()
        time.sleep(0.02)
        assert guest.counters() == frozen
        with pytest.raises(DeviceError, match=expected):
            runner.resume()  # a faulted vCPU cannot run on
        assert runner.state is RunnerState.STOPPED


@needs_kvm
def test_a_triple_fault_is_an_error_naming_the_vcpu(guest_of: Callable[..., Guest],
                                                    engine: EngineName) -> None:
    guest = guest_of(3, programs={1: TRIPLE_FAULT, 2: IO_OUT})
    with VcpuRunner(guest.vcpus, engine=engine) as runner:
        runner.start()
        wait_until(lambda: len(runner.faults) == 2, "both faults seen")
        with pytest.raises(DeviceError, match="cpu/1: KVM_RUN exited with SHUTDOWN: the "
                                              "guest triple-faulted") as raised:
            runner.stop()
        assert any("cpu/2" in note for note in raised.value.__notes__)
        assert [f.reason for f in runner.faults] == [ExitReason.SHUTDOWN, ExitReason.IO]


# ------------------------------------------------------------------- without KVM


def _snapshot(reason: int, union: bytes = b"") -> bytes:
    head = bytearray(SNAPSHOT_BYTES)
    struct.pack_into("=I", head, 8, reason)
    head[32:32 + len(union)] = union
    return bytes(head)


@pytest.mark.parametrize(("reason", "union", "expected"), [
    (ExitReason.SHUTDOWN, b"", "SHUTDOWN: the guest triple-faulted"),
    (ExitReason.IO, struct.pack("=BBHIQ", 0, 2, 0x3F8, 1, 0),
     "IO: 1 x 2-byte in from port 0x3f8, which no device"),
    (ExitReason.MMIO, struct.pack("=Q8sIB", 0xFEE00000, b"", 4, 1),
     "MMIO: a 4-byte write at guest-physical 0xfee00000, outside the guest's RAM"),
    (ExitReason.INTERNAL_ERROR, struct.pack("=II", 1, 0),
     "INTERNAL_ERROR: instruction emulation failed"),
    (ExitReason.INTERNAL_ERROR, struct.pack("=II", 9, 0), "INTERNAL_ERROR: suberror 9"),
    (ExitReason.FAIL_ENTRY, struct.pack("=QI", 0x80000021, 1),
     "FAIL_ENTRY: hardware entry failure reason 0x80000021 on host CPU 1"),
    (ExitReason.HLT, b"", "HLT"),
    (99, b"", "exit reason 99, which the runner does not know"),
])
def test_a_fault_says_what_the_guest_did(reason: int, union: bytes, expected: str) -> None:
    fault = VcpuFault.of(7, 0, _snapshot(reason, union))
    error = fault.error()
    assert isinstance(error, DeviceError) and error.device == "cpu/7"
    assert str(error).startswith(f"cpu/7: KVM_RUN exited with {expected}")


def test_a_failed_kvm_run_carries_its_errno() -> None:
    error = VcpuFault.of(3, errno.EFAULT, _snapshot(0)).error()
    assert isinstance(error, KvmError) and error.errno == errno.EFAULT
    assert str(error) == "cpu/3: KVM_RUN failed: EFAULT (Bad address)"


@pytest.mark.skipif(not NATIVE_BUILT, reason="devstate.devices.kvm._run is not built")
def test_both_engines_keep_the_same_snapshot() -> None:
    from devstate.devices.kvm import _run
    assert _run.SNAPSHOT_BYTES == SNAPSHOT_BYTES


def test_the_engine_follows_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENGINE_VARIABLE, "ctypes")
    assert run_engine_name() is EngineName.CTYPES
    monkeypatch.setattr(run, "_native", lambda: None)
    monkeypatch.setenv(ENGINE_VARIABLE, "native")
    with pytest.raises(SpecError, match="_run was not built"):
        run_engine_name()
    monkeypatch.delenv(ENGINE_VARIABLE)
    # Only _run missing (an older build): the fallback, without an error.
    assert run_engine_name() is EngineName.CTYPES


@needs_kvm
def test_the_ctypes_runner_needs_the_main_thread_for_its_handler(
        guest_of: Callable[..., Guest]) -> None:
    guest = guest_of(1)
    previous = signal.signal(KICK_SIGNAL, signal.SIG_DFL)
    try:
        failures: list[BaseException] = []

        def make() -> None:
            try:
                VcpuRunner(guest.vcpus, engine=EngineName.CTYPES).close()
            except DeviceError as exc:
                failures.append(exc)

        maker = threading.Thread(target=make)
        maker.start()
        maker.join()
        assert len(failures) == 1 and "only from the main thread" in str(failures[0])
        VcpuRunner(guest.vcpus, engine=EngineName.CTYPES).close()  # here it may
        assert signal.getsignal(KICK_SIGNAL) is not signal.SIG_DFL
    finally:
        signal.signal(KICK_SIGNAL, signal.SIG_DFL if previous is None else previous)
