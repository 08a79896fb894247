"""The live guest (devstate.devices.kvm.guest, .guest_program): its bytes are guest.S's, its
layout fits the machines devstate runs, and on real vCPUs it counts, keeps its checksums,
halts between ticks, and writes a failure code naming the check that a corrupted register
or RAM word breaks, which the continuity check reports.

The vCPUs here are run by a minimal runner of this file's own (Python threads calling
KVM_RUN, stopped with ``kvm_run.immediate_exit`` and a signal), not by the run engine
(devstate.devices.kvm.run), so that these tests judge the guest alone. Tests that need
``/dev/kvm`` skip with the reason when it is missing or cannot be opened; those that
assemble guest.S skip when GNU as is missing.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import resource
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from devstate.config.spec import parse_spec
from devstate.devices.kvm import guest, guest_view, structs, uapi
from devstate.devices.kvm import guest_program as gp
from devstate.devices.kvm.guest import GuestLayout, GuestParams
from devstate.devices.kvm.guest_view import GuestView
from devstate.devices.kvm.ram import GuestRam
from devstate.devices.kvm.uapi import Ioctl, KvmError
from devstate.devices.kvm.vcpu import KvmVcpu
from devstate.devices.kvm.vm import KvmVm
from devstate.errors import SpecError
from devstate.migration.guest import LATE_VCPUS_S, RUN_BEFORE_CHECK_S, LiveMemory
from devstate.report.guest import GuestReport
from tests.kvm_access import needs_kvm

MIB = 1 << 20
SOURCE = Path(guest.__file__).with_name("guest.S")


TOOLS_MISSING = [tool for tool in ("as", "objcopy", "nm") if shutil.which(tool) is None]


# ------------------------------------------------------------------ the bytes are guest.S's


@pytest.mark.skipif(bool(TOOLS_MISSING), reason=f"binutils missing: {TOOLS_MISSING}")
def test_program_table_is_guest_s_assembled(tmp_path: Path) -> None:
    obj, binary = tmp_path / "guest.o", tmp_path / "guest.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(SOURCE)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)],
                   check=True)
    assert binary.read_bytes() == gp.PROGRAM
    symbols: dict[str, dict[str, int]] = {"a": {}, "t": {}}
    listing = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        value, kind, name = line.split()
        symbols[kind][name] = int(value, 16)
    assert symbols["a"] == dict(gp.SYMBOLS)  # every .set, and no other
    assert symbols["t"] == dict(gp.LABELS)


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize(("vcpus", "ram"), [(4, 4 * MIB), (288, 256 * MIB), (288, 1024 * MIB),
                                             (1024, 64 * MIB), (1, 64 * 1024 * MIB)])
def test_layout_fits_the_machines_devstate_runs(vcpus: int, ram: int) -> None:
    layout = GuestLayout.of(vcpus, ram)
    assert layout.min_ram_bytes(vcpus) <= ram
    assert layout.area(0) >= gp.GDT + layout.gdt_limit + 1  # the GDT ends before the areas
    assert layout.area(vcpus - 1) + guest.AREA_BYTES == layout.working_sets
    end = layout.working_set(vcpus - 1) + layout.working_set_pages * gp.PAGE_BYTES
    assert end <= min(ram, 3 << 30)  # the working sets lie in mapped RAM below the hole


def test_288_vcpus_fit_in_a_few_mib_and_get_working_sets_from_the_rest() -> None:
    assert GuestLayout.min_ram_bytes(288) < 2 * MIB
    assert GuestLayout.of(288, 256 * MIB).working_set_pages > 200


def test_ram_too_small_names_the_minimum() -> None:
    need = GuestLayout.min_ram_bytes(64)
    with pytest.raises(SpecError, match=rf"ram\.size: .* 64 vCPUs: it needs at least {need} B"):
        GuestLayout.of(64, need - gp.PAGE_BYTES)
    assert GuestLayout.of(64, need).working_set_pages == 0


@pytest.mark.parametrize(("vcpus", "ram", "field"), [
    (0, 4 * MIB, "vcpus.count"), (4, 4 * MIB + 1, "ram.size")])
def test_layout_refuses_nonsense(vcpus: int, ram: int, field: str) -> None:
    with pytest.raises(SpecError, match=rf"^{field}: "):
        GuestLayout.of(vcpus, ram)


@pytest.mark.parametrize(("params", "field"), [
    (GuestParams(tick_ns=100_000), "tick_ns"),
    (GuestParams(tick_ns=1 << 32), "tick_ns"),
    (GuestParams(loops_per_tick=0), "loops_per_tick"),
    (GuestParams(working_set_pages=10_000), "working_set_pages"),
    (GuestParams(dirty_pages_per_tick=1), "dirty_pages_per_tick"),
    (GuestParams(dirty_pages_per_tick=-1, working_set_pages=1), "dirty_pages_per_tick"),
])
def test_params_the_layout_cannot_run_are_refused(params: GuestParams, field: str) -> None:
    layout = GuestLayout.of(4, 4 * MIB)
    with pytest.raises(SpecError, match=rf"^guest\.{field}: "):
        params.check(layout)


# ------------------------------------------------------------ install and the view (no KVM)


@pytest.fixture
def installed() -> Iterator[tuple[GuestRam, GuestLayout]]:
    """4 vCPUs' guest installed in 4 MiB, never run."""
    with GuestRam.create(4 * MIB, "guest-test") as ram:
        layout = GuestLayout.of(4, ram.size)
        guest.install(ram.view, layout, GuestParams(working_set_pages=8))
        yield ram, layout


def test_install_writes_tables_that_point_at_the_program(
        installed: tuple[GuestRam, GuestLayout]) -> None:
    ram, layout = installed
    view = ram.view
    assert bytes(view[gp.CODE:gp.CODE + len(gp.PROGRAM)]) == gp.PROGRAM

    def gate(vector: int) -> int:
        low, high = struct.unpack_from("<2Q", view, gp.IDT + 16 * vector)
        assert low >> 16 & 0xFFFF == gp.KERNEL_CODE_SELECTOR
        return (low & 0xFFFF | (low >> 48) << 16 | high << 32) - gp.CODE

    assert gate(gp.TIMER_VECTOR) == gp.LABELS["timer_interrupt"]
    assert gate(gp.SPURIOUS_VECTOR) == gp.LABELS["spurious_interrupt"]
    assert gate(gp.INVALID_OPCODE_VECTOR) == gp.LABELS["invalid_opcode"]
    assert gate(13) == gp.LABELS["exceptions"] + 4 * 13
    assert struct.unpack_from("<2Q", view, gp.IDT + 16 * 0x40) == (0, 0)  # not present
    # The page tables map the LAPIC's page to itself (guest-physical = virtual).
    directory = struct.unpack_from("<Q", view, gp.PDPT + 8 * 3)[0] & ~0xFFF
    lapic = struct.unpack_from("<Q", view, directory + 8 * (gp.APIC_BASE >> 21 & 511))[0]
    assert lapic & ~0xFFF == gp.APIC_BASE & ~((1 << 21) - 1)
    for index in range(layout.vcpus):
        area = layout.area(index)
        index_at, stack_top, block, ws = struct.unpack_from("<4Q", view, area + gp.CB_INDEX)
        assert (index_at, stack_top, block) == (index, area + gp.USER_STACK_TOP,
                                                area + gp.CHECKSUM_BLOCK)
        assert ws == layout.working_set(index)
        rsp0 = struct.unpack_from("<Q", view, area + gp.TSS + 4)[0]
        assert rsp0 == area + gp.KERNEL_STACK_TOP


def test_a_fresh_guest_reads_as_installed_and_whole(
        installed: tuple[GuestRam, GuestLayout]) -> None:
    ram, layout = installed
    view = GuestView(ram.view, layout)
    assert view.installed
    assert not view.counters().any() and view.failures() == ()
    assert view.checksums(settle_s=0).hold


def put_u64(ram: GuestRam, layout: GuestLayout, index: int, field: int, value: int) -> None:
    """Write a control-block field of vCPU ``index`` as the guest would."""
    size = 8 if field in (gp.CB_COUNTER, gp.CB_FAIL_VALUE) else 4
    ram.view[layout.area(index) + field:layout.area(index) + field + size] = \
        value.to_bytes(size, "little")


def advance_all(ram: GuestRam, layout: GuestLayout) -> None:
    for index in range(layout.vcpus):
        put_u64(ram, layout, index, gp.CB_COUNTER, 1000 + index)


def test_continuity_of_a_guest_that_went_on(installed: tuple[GuestRam, GuestLayout]) -> None:
    ram, layout = installed
    view = GuestView(ram.view, layout)
    before = view.counters()
    advance_all(ram, layout)
    assert guest_view.continuity(before, view) == guest_view.Continuity(4, 4, True, "")


def test_continuity_names_a_failure_code(installed: tuple[GuestRam, GuestLayout]) -> None:
    ram, layout = installed
    view = GuestView(ram.view, layout)
    before = view.counters()
    advance_all(ram, layout)
    put_u64(ram, layout, 2, gp.CB_FAIL_CODE, gp.Failure.VECTOR_REGISTER)
    seen = guest_view.continuity(before, view)
    assert (seen.vcpus_running, seen.continued) == (4, False)
    assert seen.why == "cpu/2 failure code 2 (vector register YMM0)"


def test_continuity_names_a_vcpu_that_stopped_counting(
        installed: tuple[GuestRam, GuestLayout]) -> None:
    ram, layout = installed
    view = GuestView(ram.view, layout)
    advance_all(ram, layout)
    before = view.counters()
    put_u64(ram, layout, 1, gp.CB_COUNTER, 5)  # went back
    put_u64(ram, layout, 3, gp.CB_COUNTER, 1000 + 3 + 7)
    put_u64(ram, layout, 0, gp.CB_COUNTER, 1000 + 1)
    seen = guest_view.continuity(before, view)
    assert (seen.vcpus_running, seen.continued) == (2, False)
    assert seen.why == "cpu/1 counter went back from 1001 to 5; cpu/2 counter stayed at 1002"
    assert seen.final  # a counter gone back stays wrong, however long one waits


def test_a_vcpu_that_has_not_moved_yet_is_worth_another_look(
        installed: tuple[GuestRam, GuestLayout]) -> None:
    ram, layout = installed
    view = GuestView(ram.view, layout)
    before = view.counters()
    advance_all(ram, layout)
    put_u64(ram, layout, 2, gp.CB_COUNTER, 0)
    seen = guest_view.continuity(before, view)
    assert (seen.continued, seen.final, seen.why) == (False, False, "cpu/2 counter stayed at 0")
    put_u64(ram, layout, 2, gp.CB_FAIL_CODE, gp.Failure.VECTOR_REGISTER)
    assert guest_view.continuity(before, view).final  # now it never will


def test_the_destination_looks_again_for_vcpus_slow_to_move() -> None:
    """LiveMemory.continuity: a vCPU that moves only after the first look (its first entry
    into KVM_RUN late on a loaded host) still counts as continued; one that never moves
    is reported once the looks give up."""
    spec = parse_spec({"vcpus": {"count": 4, "backend": "kvm"}, "ram": {"size": "4MiB"}})

    async def judge(late_s: float | None) -> tuple[GuestReport, float]:
        with LiveMemory(spec, side="test", incoming=False) as memory:
            before = memory.counters()

            async def nothing_wrong() -> str | None:
                return None

            async def move_late() -> None:
                assert late_s is not None
                await asyncio.sleep(late_s)
                for index in range(4):
                    offset = memory.layout.area(index) + gp.CB_COUNTER
                    memory.ram.view[offset:offset + 8] = (7 + index).to_bytes(8, "little")

            mover = asyncio.ensure_future(move_late()) if late_s is not None else None
            started = time.monotonic()
            report = await memory.continuity(before, nothing_wrong)
            if mover is not None:
                await mover
            return report, time.monotonic() - started

    report, took = asyncio.run(judge(RUN_BEFORE_CHECK_S + 0.3))
    assert report.continued and report.vcpus_running == 4, report.why
    assert RUN_BEFORE_CHECK_S + 0.3 <= took < RUN_BEFORE_CHECK_S + LATE_VCPUS_S
    report, took = asyncio.run(judge(None))
    assert not report.continued and report.why.startswith("cpu/0 counter stayed at 0")
    assert took >= RUN_BEFORE_CHECK_S + LATE_VCPUS_S


def test_continuity_recounts_the_checksum_blocks(
        installed: tuple[GuestRam, GuestLayout]) -> None:
    ram, layout = installed
    view = GuestView(ram.view, layout)
    before = view.counters()
    advance_all(ram, layout)
    word = layout.area(3) + gp.CHECKSUM_BLOCK + 4 * 17
    ram.view[word] ^= 1
    assert view.checksums(settle_s=0) == guest_view.ChecksumCheck(bad=(3,), unsettled=())
    seen = guest_view.continuity(before, view)
    assert not seen.continued and seen.why == "cpu/3 checksum does not hold"


def test_a_block_mid_update_is_unverified_not_bad(
        installed: tuple[GuestRam, GuestLayout]) -> None:
    """A vCPU inside its seqlock (SEQ odd) has a block and a sum that may disagree: the
    host looks again, and says it could not verify rather than that it is wrong."""
    ram, layout = installed
    view = GuestView(ram.view, layout)
    put_u64(ram, layout, 1, gp.CB_SEQ, 7)
    ram.view[layout.area(1) + gp.CHECKSUM_BLOCK] = 5  # the word changed, the sum not yet
    started = time.monotonic()
    assert view.checksums(settle_s=0.05) == guest_view.ChecksumCheck(bad=(), unsettled=(1,))
    assert 0.05 <= time.monotonic() - started < 1
    before = view.counters()
    advance_all(ram, layout)
    assert guest_view.continuity(before, view, settle_s=0).why == \
        "cpu/1 checksum unverified (mid-update at every look)"


def test_continuity_of_ram_without_the_program(installed: tuple[GuestRam, GuestLayout]) -> None:
    ram, layout = installed
    ram.view[gp.PARAMS_MAGIC:gp.PARAMS_MAGIC + 4] = bytes(4)
    seen = guest_view.continuity(np.zeros(4, np.uint64), GuestView(ram.view, layout))
    assert seen == guest_view.Continuity(4, 0, False, "the guest RAM holds no installed guest "
                                                 "program for 4 vCPUs")


def test_continuity_names_a_few_problems_and_counts_the_rest(
        installed: tuple[GuestRam, GuestLayout]) -> None:
    ram, layout = installed
    view = GuestView(ram.view, layout)
    for index in range(4):
        put_u64(ram, layout, index, gp.CB_FAIL_CODE, gp.Failure.STACK)
        put_u64(ram, layout, index, gp.CB_FAIL_VALUE, 0x1234)
    why = guest_view.continuity(view.counters(), view).why
    assert why.startswith("cpu/0 failure code 5 (stack pointer RSP = 0x1234); cpu/1 ")
    assert why.endswith("; and 4 more")  # 4 failures shown, then 4 counters that stayed


# ----------------------------------------------------------------- real vCPUs running it


KICK = signal.SIGUSR1
KVM_EXIT_INTR = 10


class Runner:
    """Every vCPU of a VM in KVM_RUN on a Python thread of its own, stopped and resumed
    together: the least that runs the guest (the run engine is devstate.devices.kvm.run)."""

    def __init__(self, vcpus: list[KvmVcpu], run_bytes: int) -> None:
        self._fds = [vcpu.fd for vcpu in vcpus]
        self._runs = [mmap.mmap(vcpu.fd, run_bytes) for vcpu in vcpus]
        self._going = threading.Event()  # set: threads may be in KVM_RUN
        self._parked = [threading.Event() for _ in vcpus]  # set: out of KVM_RUN, waiting
        self._closing = False
        self.exits: dict[int, str] = {}  # vCPU -> an exit the guest should never make
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"vcpu-{i}")
                         for i in range(len(vcpus))]
        for thread in self._threads:
            thread.start()

    def _run(self, i: int) -> None:
        while True:
            self._going.wait()
            if self._closing:
                return
            try:
                uapi.ioctl(self._fds[i], Ioctl.KVM_RUN, device=f"cpu/{i}")
                reason = struct.unpack_from("<I", self._runs[i], 8)[0]
                if reason != KVM_EXIT_INTR:
                    self.exits[i] = f"KVM exit {reason}"
            except KvmError as exc:
                if exc.errno != errno.EINTR:
                    self.exits[i] = str(exc)
            if i in self.exits:
                self._parked[i].set()
                return
            if not self._going.is_set():
                self._parked[i].set()

    def resume(self) -> None:
        """Every vCPU back into KVM_RUN."""
        for parked, run in zip(self._parked, self._runs, strict=True):
            parked.clear()
            run[1] = 0  # immediate_exit
        self._going.set()

    def stop(self) -> None:
        """Every vCPU out of KVM_RUN: immediate_exit for one about to enter, a signal for
        one inside (KVM_RUN returns EINTR)."""
        self._going.clear()
        for run in self._runs:
            run[1] = 1
        for thread, parked in zip(self._threads, self._parked, strict=True):
            while thread.is_alive() and not parked.wait(0.005):
                signal.pthread_kill(thread.ident or 0, KICK)

    def close(self) -> None:
        self._closing = True
        self.stop()
        self._going.set()
        for thread in self._threads:
            thread.join()
        for run in self._runs:
            run.close()


@dataclass
class LiveGuest:
    """A KVM VM whose vCPUs run the installed guest program."""

    vm: KvmVm
    ram: GuestRam
    layout: GuestLayout
    vcpus: list[KvmVcpu]
    runner: Runner

    @property
    def view(self) -> GuestView:
        return GuestView(self.ram.view, self.layout)

    def wait_all_advance(self, timeout: float = 10.0) -> None:
        """Until every vCPU's counter moved (fails naming the stuck ones)."""
        before = self.view.counters()
        deadline = time.monotonic() + timeout
        while (stuck := np.flatnonzero(self.view.counters() == before)).size:
            if time.monotonic() > deadline:
                pytest.fail(f"vCPUs {stuck.tolist()} did not advance in {timeout} s; "
                            f"exits: {self.runner.exits}, failures: {self.view.failures()}")
            time.sleep(0.01)


@pytest.fixture(scope="module")
def kick_handler() -> Iterator[None]:
    """A handler for the kick signal that does nothing: its only job is making KVM_RUN
    return EINTR in the thread it hits (installed here, on the main thread)."""
    previous = signal.signal(KICK, lambda signum, frame: None)
    yield
    signal.signal(KICK, previous)


@pytest.fixture
def live_guest(kick_handler: None) -> Iterator[Callable[..., LiveGuest]]:
    """Start guests (``vcpus``, ``ram_bytes``, ``params``, ``log_dirty``); each is closed
    after the test."""
    made: list[LiveGuest] = []
    with open("/dev/kvm", "rb", buffering=0) as kvm:
        run_bytes = uapi.ioctl(kvm.fileno(), Ioctl.KVM_GET_VCPU_MMAP_SIZE)

    def start(vcpus: int, ram_bytes: int = 4 * MIB,
              params: GuestParams = guest.DEFAULT_PARAMS, log_dirty: bool = False) -> LiveGuest:
        vm = KvmVm()
        ram = GuestRam.create(ram_bytes, "guest-test")
        try:
            vm.map_ram(ram, log_dirty=log_dirty)
            layout = GuestLayout.of(vcpus, ram.size)
            guest.install(ram.view, layout, params)
            cpus = [vm.create_vcpu(i) for i in range(vcpus)]
            for index, vcpu in enumerate(cpus):
                guest.enter(vcpu, index, layout)
            runner = Runner(cpus, run_bytes)
        except BaseException:
            vm.close()
            ram.close()
            raise
        made.append(LiveGuest(vm, ram, layout, cpus, runner))
        runner.resume()
        return made[-1]

    yield start
    for live in made:
        live.runner.close()
        live.vm.close()  # before the RAM: KVM holds its address
        live.ram.close()


@needs_kvm
@pytest.mark.parametrize("vcpus", [4, 64])
def test_vcpus_run_the_program_and_keep_every_check(
        live_guest: Callable[..., LiveGuest], vcpus: int) -> None:
    live = live_guest(vcpus, 16 * MIB)
    live.wait_all_advance()
    live.runner.stop()
    before = live.view.counters()
    ticks = live.view.ticks()
    live.runner.resume()
    time.sleep(0.3)
    seen = guest_view.continuity(before, live.view)
    assert seen == guest_view.Continuity(vcpus, vcpus, True, ""), live.runner.exits
    assert (live.view.ticks() > ticks).all()  # the timer interrupts came
    assert live.runner.exits == {}


@needs_kvm
def test_stopped_vcpus_do_not_count(live_guest: Callable[..., LiveGuest]) -> None:
    live = live_guest(4)
    live.wait_all_advance()
    live.runner.stop()
    before = live.view.counters()
    time.sleep(0.2)
    assert (live.view.counters() == before).all()
    assert guest_view.continuity(before, live.view).vcpus_running == 0


@needs_kvm
def test_halting_vcpus_leave_the_host_cpus_alone(live_guest: Callable[..., LiveGuest]) -> None:
    """64 vCPUs halt between ticks: a second of them costs a fraction of one host CPU,
    where busy vCPUs would take every CPU there is (2 here)."""
    live = live_guest(64, 16 * MIB)
    live.wait_all_advance()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    time.sleep(1.0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = time.monotonic() - started
    cpu_s = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    assert cpu_s < 0.5 * elapsed, f"64 halting vCPUs took {cpu_s:.2f} CPU-s in {elapsed:.2f} s"


def corrupt_rbp(vcpu: KvmVcpu) -> None:
    regs = structs.kvm_regs()
    uapi.ioctl(vcpu.fd, Ioctl.KVM_GET_REGS, regs)
    regs.rbp ^= 1 << 40
    uapi.ioctl(vcpu.fd, Ioctl.KVM_SET_REGS, regs)


def corrupt_xsave(offset: int) -> Callable[[KvmVcpu], None]:
    """Flip a bit of the XSAVE area's byte ``offset`` (KVM_GET/SET_XSAVE)."""
    def corrupt(vcpu: KvmVcpu) -> None:
        state = structs.xsave_type(vcpu.layout.xsave_size)()
        uapi.ioctl(vcpu.fd, Ioctl.KVM_GET_XSAVE, state)
        raw = memoryview(state).cast("B")
        raw[offset] ^= 0x10
        uapi.ioctl(vcpu.fd, Ioctl.KVM_SET_XSAVE, state)
    return corrupt


XMM0 = 160  # the legacy region's XMM0 (FXSAVE layout)
YMM15_HIGH = 576 + 16 * 15  # XSAVE component 2 (YMM_Hi128) at its standard offset, YMM15


@needs_kvm
@pytest.mark.parametrize(("corrupt", "why"), [
    (corrupt_rbp, "failure code 1 (general register RBP = "),
    (corrupt_xsave(XMM0), "failure code 2 (vector register YMM0)"),
    (corrupt_xsave(YMM15_HIGH), "failure code 2 (vector register YMM15)"),
], ids=["rbp", "xmm0", "ymm15-upper-half"])
def test_a_corrupted_register_is_named_by_the_vcpu_that_holds_it(
        live_guest: Callable[..., LiveGuest], corrupt: Callable[[KvmVcpu], None],
        why: str) -> None:
    live = live_guest(4)
    live.wait_all_advance()
    live.runner.stop()
    before = live.view.counters()
    corrupt(live.vcpus[2])
    live.runner.resume()
    deadline = time.monotonic() + 10
    while not live.view.failures() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the others go on counting
    seen = guest_view.continuity(before, live.view)
    assert not seen.continued and seen.why.startswith(f"cpu/2 {why}"), seen
    assert [failure.vcpu for failure in live.view.failures()] == [2]
    assert live.runner.exits == {}  # the guest halted itself: no exit, no triple fault


@needs_kvm
def test_a_corrupted_ram_word_fails_the_host_check_and_the_guests(
        live_guest: Callable[..., LiveGuest]) -> None:
    live = live_guest(4)
    live.wait_all_advance()
    live.runner.stop()
    before = live.view.counters()
    # A vCPU stopped inside its seqlock has a block the host cannot judge: pick another.
    seqs = [struct.unpack_from("<I", live.ram.view, live.layout.area(i) + gp.CB_SEQ)[0]
            for i in range(4)]
    victim = next(i for i in (1, 2, 3, 0) if seqs[i] % 2 == 0)
    word = live.layout.area(victim) + gp.CHECKSUM_BLOCK + 4 * 33
    live.ram.view[word] ^= 0x40
    assert victim in live.view.checksums(settle_s=0.05).bad
    live.runner.resume()
    time.sleep(0.3)
    seen = guest_view.continuity(before, live.view)
    assert not seen.continued
    assert seen.why.startswith(f"cpu/{victim} failure code 3 (RAM checksum"), seen


@needs_kvm
def test_a_vcpu_whose_timer_is_lost_stops_counting(live_guest: Callable[..., LiveGuest]) -> None:
    """Its LAPIC timer is what wakes a vCPU from each tick's HLT: with the timer's count
    cleared (KVM_SET_LAPIC, as a migration that lost it would), it sleeps for good."""
    live = live_guest(4)
    live.wait_all_advance()
    live.runner.stop()
    lapic = structs.kvm_lapic_state()
    uapi.ioctl(live.vcpus[1].fd, Ioctl.KVM_GET_LAPIC, lapic)
    struct.pack_into("<I", lapic, gp.APIC_TMICT, 0)  # initial count 0: the timer stops
    uapi.ioctl(live.vcpus[1].fd, Ioctl.KVM_SET_LAPIC, lapic)
    live.runner.resume()
    time.sleep(0.3)  # long enough for vCPU 1 to finish the tick it was stopped in
    before = live.view.counters()
    time.sleep(0.3)
    seen = guest_view.continuity(before, live.view)
    assert (seen.vcpus_running, seen.continued) == (3, False)
    assert seen.why == f"cpu/1 counter stayed at {before[1]}"


def dirty_pages(live: LiveGuest) -> set[int]:
    """The RAM pages the guest wrote since the last call (KVM_GET_DIRTY_LOG, slot 0)."""
    pages = live.ram.size // gp.PAGE_BYTES
    bitmap = np.zeros(-(-pages // 64), np.uint64)
    log = structs.kvm_dirty_log(slot=0, dirty_bitmap=bitmap.ctypes.data)
    uapi.ioctl(live.vm.fd, Ioctl.KVM_GET_DIRTY_LOG, log)
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:pages]
    return set(np.flatnonzero(bits).tolist())


@needs_kvm
def test_each_tick_dirties_pages_of_the_working_set(live_guest: Callable[..., LiveGuest]) -> None:
    """Every tick a vCPU writes DIRTY_PAGES pages of its working set, in turn, and no page
    past the WS_PAGES it was given: what KVM's dirty log (precopy's view) sees too."""
    params = GuestParams(tick_ns=10_000_000, dirty_pages_per_tick=3, working_set_pages=8)
    live = live_guest(4, 4 * MIB, params, log_dirty=True)
    live.wait_all_advance()
    dirty_pages(live)  # from now on
    time.sleep(0.2)  # 20 ticks: 60 pages written per vCPU, each of its 8 pages many times
    dirty = dirty_pages(live)
    layout = live.layout
    for index in range(4):
        first = layout.working_set(index) // gp.PAGE_BYTES
        assert set(range(first, first + 8)) <= dirty, f"cpu/{index}"
        assert first + 8 not in dirty  # its share goes on, unused
        stamps = np.frombuffer(live.ram.view, np.uint64, count=8 * 512,
                               offset=layout.working_set(index))[::512]
        assert stamps.all()  # each page holds the counter of the tick that wrote it
    # The only other pages written: each vCPU's own page (control block, checksum block,
    # stacks) and the LAPIC's EOI never lands in RAM.
    working_sets = {layout.working_set(i) // gp.PAGE_BYTES + k for i in range(4) for k in range(8)}
    assert dirty - working_sets == {layout.area(i) // gp.PAGE_BYTES for i in range(4)}


@needs_kvm
@pytest.mark.parametrize("ram_moves", [True, False], ids=["with-ram", "ram-left-behind"])
def test_the_guest_goes_on_in_another_vm_after_its_state_and_ram_move(
        live_guest: Callable[..., LiveGuest], ram_moves: bool) -> None:
    """What a migration does, in one process: stop, get every vCPU's record and the VM's
    state, copy the RAM, put them into a second VM's vCPUs, run them there."""
    source = live_guest(8, 8 * MIB)
    source.wait_all_advance()
    source.runner.stop()
    before = source.view.counters()
    records = []
    for vcpu in source.vcpus:
        record = bytearray(vcpu.layout.record_bytes)
        records.append(record[:vcpu.get(memoryview(record))])
    destination = live_guest(8, 8 * MIB)  # a guest of its own, stopped and overwritten
    destination.runner.stop()
    destination.ram.view[:] = source.ram.view if ram_moves else bytes(8 * MIB)
    destination.vm.put_state(source.vm.get_state())
    for vcpu, record in zip(destination.vcpus, records, strict=True):
        vcpu.put(memoryview(record))
    destination.runner.resume()
    time.sleep(0.3)
    seen = guest_view.continuity(before, destination.view)
    if ram_moves:
        assert seen == guest_view.Continuity(8, 8, True, ""), destination.runner.exits
    else:
        assert not seen.continued and "no installed guest program" in seen.why
