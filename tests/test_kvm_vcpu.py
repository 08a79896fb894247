"""Real KVM vCPUs (devstate.devices.kvm): state round trips between two VMs, KVM's order of the
get and set ioctls, the owner rule, sparse vCPU ids, and what a get and a put cost.

Tests that need ``/dev/kvm`` skip with the reason when it is missing or cannot be opened;
the ordering and record-validation tests drive a fake ioctl and run everywhere.
"""

from __future__ import annotations

import ctypes
import errno
import os
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from devstate.devices.kvm import structs, uapi
from devstate.devices.kvm.record import (
    RESTORE_ORDER,
    SAVE_ORDER,
    Section,
    VcpuLayout,
    XsaveComponent,
    msr_chunks,
)
from devstate.devices.kvm.uapi import Ioctl, IoctlArg, ioctl_name
from devstate.devices.kvm.vcpu import KvmVcpu
from devstate.devices.kvm.verify import TOLERANCES, section_fields
from devstate.devices.kvm.vm import VM_SAVE_ORDER, KvmVm, VmSection
from devstate.errors import DeviceError
from tests.kvm_access import needs_kvm

SEED = 20260521


def get(vcpu: KvmVcpu) -> bytes:
    """The vCPU's state as a fresh record."""
    out = bytearray(vcpu.layout.record_bytes)
    assert vcpu.get(memoryview(out)) == len(out)
    return bytes(out)


class Recorder:
    """An injectable ioctl that logs (fd, ioctl name); forwards to KVM, or fakes success."""

    def __init__(self, *, forward: bool) -> None:
        self.calls: list[tuple[int, str]] = []
        self._forward = forward

    def __call__(self, fd: int, request: int, arg: IoctlArg = None, *,
                 device: str = "kvm") -> int:
        self.calls.append((fd, ioctl_name(request)))
        if self._forward:
            return uapi.ioctl(fd, request, arg, device=device)
        if request in (Ioctl.KVM_GET_MSRS, Ioctl.KVM_SET_MSRS):
            assert isinstance(arg, ctypes.Structure)
            return arg.nmsrs  # all of the batch processed
        return 0

    def names(self, fd: int) -> list[str]:
        """The ioctls issued on ``fd``, in order."""
        return [name for call_fd, name in self.calls if call_fd == fd]


def expected_ioctls(order: tuple[Section, ...], direction: str, layout: VcpuLayout) -> list[str]:
    """The ioctl names an order must produce, written out independently of KvmVcpu."""
    names = []
    for section in order:
        name = section.name
        if section is Section.SREGS and layout.sregs2:
            name = "SREGS2"
        if section is Section.XSAVE and layout.xsave2 and direction == "GET":
            name = "XSAVE2"
        if section is Section.MSRS:
            # As few batches of <= 256 as possible (writes: the deferred MSRs last).
            count = (-(-len(layout.msr_indices) // 256) if direction == "GET"
                     else len(layout.msr_chunks))
        else:
            count = 1
        names += [f"KVM_{direction}_{name}"] * count
    return names


# ------------------------------------------------------------------- order (no KVM needed)

LAYOUTS = {
    "sregs2+xsave2": VcpuLayout(sregs2=True, xsave2=True, xsave_size=4096,
                                msr_chunks=msr_chunks([0x10, 0x6E0, 0x174, 0x277])),
    "sregs+xsave": VcpuLayout(sregs2=False, xsave2=False, xsave_size=4096,
                              msr_chunks=msr_chunks([0x10, 0x174])),
    "300 MSRs": VcpuLayout(sregs2=True, xsave2=True, xsave_size=8192,
                           msr_chunks=msr_chunks([0x6E0, *range(0x1000, 0x1000 + 299)])),
}


@pytest.fixture
def devnull_fd() -> Iterator[int]:
    """A real fd for a fake vCPU to own and close."""
    fd = os.open(os.devnull, os.O_RDONLY)
    yield fd


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_get_and_put_issue_the_ioctls_in_save_and_restore_order(layout: VcpuLayout,
                                                                devnull_fd: int) -> None:
    recorder = Recorder(forward=False)
    vcpu = KvmVcpu(devnull_fd, 5, layout, ioctl=recorder)
    record = get(vcpu)
    assert recorder.names(devnull_fd) == expected_ioctls(SAVE_ORDER, "GET", layout)
    recorder.calls.clear()
    vcpu.put(memoryview(record))
    assert recorder.names(devnull_fd) == expected_ioctls(RESTORE_ORDER, "SET", layout)
    vcpu.close()
    vcpu.close()  # idempotent


def test_deferred_msrs_are_set_after_all_others_in_as_few_batches_as_fit() -> None:
    assert msr_chunks([0x6E0, 0x10, 0x174]) == ((0x10, 0x174, 0x6E0),)
    chunks = LAYOUTS["300 MSRs"].msr_chunks
    assert [len(c) for c in chunks] == [256, 44] and chunks[-1][-1] == 0x6E0


def test_put_refuses_a_bad_record_before_loading_anything(devnull_fd: int) -> None:
    layout = LAYOUTS["sregs2+xsave2"]
    recorder = Recorder(forward=False)
    vcpu = KvmVcpu(devnull_fd, 5, layout, ioctl=recorder)
    record = get(vcpu)
    other_msrs = KvmVcpu(devnull_fd, 5, VcpuLayout(
        sregs2=True, xsave2=True, xsave_size=4096,
        msr_chunks=msr_chunks([0x10, 0x6E0, 0x175, 0x277])), ioctl=recorder)
    recorder.calls.clear()
    cases = {
        "is for id 5, not 6": (KvmVcpu(devnull_fd, 6, layout, ioctl=recorder), record),
        "truncated inside VCPU_EVENTS": (vcpu, record[:-1]),
        "after the last section": (vcpu, record + b"\0"),
        "bad record magic": (vcpu, b"VCPU" + record[4:]),
        "MSR #1 is IA32_SYSENTER_CS, this VM migrates IA32_SYSENTER_ESP": (other_msrs, record),
    }
    for message, (target, data) in cases.items():
        with pytest.raises(DeviceError, match=message):
            target.put(memoryview(data))
    assert recorder.calls == []
    vcpu.close()


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_the_compared_fields_cover_every_byte_of_every_section_once(layout: VcpuLayout) -> None:
    for section in layout.sections:
        fields = section_fields(layout, section)
        covered = [b for f in fields for b in range(f.offset, f.offset + f.size)]
        assert covered == list(range(layout.section_bytes(section))), section.name


def test_compare_names_each_difference_and_tolerates_only_the_listed_ones(devnull_fd: int
                                                                           ) -> None:
    layout = VcpuLayout(sregs2=True, xsave2=True, xsave_size=4096, msr_chunks=((0x10,),),
                        xsave_components=(XsaveComponent(2, 576, 256),))
    vcpu = KvmVcpu(devnull_fd, 5, layout, ioctl=Recorder(forward=False))
    saved = get(vcpu)
    readback = bytearray(saved)
    sections = vcpu.parse(memoryview(readback))
    struct.pack_into("<Q", sections[Section.REGS], 16, 0x1234)  # rcx: not tolerated
    struct.pack_into("<Q", sections[Section.MSRS], 16, 10**9)  # IA32_TSC: within 10^10
    struct.pack_into("<I", sections[Section.LAPIC], 0x390, 0xFFFFFFFF)  # TMCCT: beyond 2*10^9
    struct.pack_into("<B", sections[Section.XSAVE], 576 + 16 * 3 + 2, 0xFF)  # YMM3_H
    del sections
    found = {(d.section, d.field): d.explained for d in vcpu.compare(saved, bytes(readback))}
    assert found == {(Section.REGS, "rcx"): False, (Section.MSRS, "IA32_TSC"): True,
                     (Section.LAPIC, "TMCCT"): False, (Section.XSAVE, "YMM3_H"): False}
    assert {(t.section, t.field) for t in TOLERANCES} == {(Section.MSRS, "IA32_TSC"),
                                                         (Section.LAPIC, "TMCCT")}
    vcpu.close()


# ------------------------------------------------------------------------ with real KVM


@needs_kvm
def test_eight_seeded_vcpus_round_trip_between_two_vms(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    with KvmVm() as source, KvmVm() as dest:
        sources = [source.create_vcpu(i) for i in range(8)]
        targets = [dest.create_vcpu(i) for i in range(8)]
        fresh = get(targets[0])
        for vcpu in sources:
            vcpu.seed_state(SEED)
        saved = [get(vcpu) for vcpu in sources]
        dest.put_state(source.get_state())  # VM-level state loads before the vCPUs
        for vcpu, record in zip(targets, saved, strict=True):
            vcpu.put(memoryview(record))
        diffs = {v.id: v.compare(r, get(v)) for v, r in zip(targets, saved, strict=True)}

    unexplained = [f"{vcpu}: {d}" for vcpu, ds in diffs.items() for d in ds if not d.explained]
    assert unexplained == []
    explained = Counter(f"{d.section.name}.{d.field}" for ds in diffs.values() for d in ds)
    with capsys.disabled():
        print(f"\n  8 vCPUs round-tripped; differences within tolerance: {dict(explained)}")
    _assert_seeded_state_is_distinct_and_not_kvm_defaults(list(zip(sources, saved, strict=True)),
                                                          (targets[0], fresh))


def _assert_seeded_state_is_distinct_and_not_kvm_defaults(
        seeded: list[tuple[KvmVcpu, bytes]], fresh: tuple[KvmVcpu, bytes]) -> None:
    sections = [vcpu.parse(memoryview(record)) for vcpu, record in seeded]
    default = fresh[0].parse(memoryview(fresh[1]))
    layout = fresh[0].layout
    # Every vCPU differs from KVM's defaults and from every other vCPU in most sections;
    # MP state, XCR0 and events have few valid values, so some vCPUs share them.
    few_values = (Section.MP_STATE, Section.XCRS, Section.VCPU_EVENTS)
    for section in (layout.resolve(s) for s in SAVE_ORDER if s not in few_values):
        assert all(s[section] != default[section] for s in sections), section.name
        assert len({bytes(s[section]) for s in sections}) == len(sections), section.name
    for section in few_values:
        assert len({bytes(s[section]) for s in sections}) > 1, section.name


@needs_kvm
def test_real_vcpu_gets_cpuid_first_and_follows_both_orders() -> None:
    recorder = Recorder(forward=True)
    with KvmVm(ioctl=recorder) as vm:
        before = len(recorder.calls)
        vcpu = vm.create_vcpu(3)
        assert recorder.calls[before:] == [(vm.fd, "KVM_CREATE_VCPU"),
                                           (vcpu.fd, "KVM_SET_CPUID2")]
        vm_calls = recorder.names(vm.fd)
        assert vm_calls.index("KVM_CREATE_IRQCHIP") < vm_calls.index("KVM_CREATE_VCPU")
        recorder.calls.clear()
        record = get(vcpu)
        vcpu.put(memoryview(record))
        assert recorder.names(vcpu.fd) == (expected_ioctls(SAVE_ORDER, "GET", vm.layout)
                                           + expected_ioctls(RESTORE_ORDER, "SET", vm.layout))


_CHILD = """
import sys
from devstate.devices.kvm import structs, uapi
vcpu_fd, vm_fd = int(sys.argv[1]), int(sys.argv[2])
for fd, request, arg in ((vcpu_fd, uapi.Ioctl.KVM_GET_REGS, structs.kvm_regs()),
                         (vm_fd, uapi.Ioctl.KVM_CREATE_VCPU, 1)):
    try:
        uapi.ioctl(fd, request, arg)
        print(0)
    except uapi.KvmError as exc:
        print(exc.errno)
"""


def _errnos_in_forked_child(vcpu_fd: int, vm_fd: int) -> list[int]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            codes = []
            for fd, request, arg in ((vcpu_fd, Ioctl.KVM_GET_REGS, structs.kvm_regs()),
                                     (vm_fd, Ioctl.KVM_CREATE_VCPU, 1)):
                try:
                    uapi.ioctl(fd, request, arg)
                    codes.append(0)
                except uapi.KvmError as exc:
                    codes.append(exc.errno or -1)
            os.write(write_end, " ".join(map(str, codes)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return [int(code) for code in answer.split()]


def _errnos_in_spawned_child(vcpu_fd: int, vm_fd: int) -> list[int]:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(vcpu_fd), str(vm_fd)],
                          pass_fds=(vcpu_fd, vm_fd), capture_output=True, text=True,
                          timeout=60, check=True)
    return [int(code) for code in done.stdout.split()]


@needs_kvm
@pytest.mark.parametrize("child", [_errnos_in_forked_child, _errnos_in_spawned_child],
                         ids=["forked", "spawned"])
def test_another_process_gets_eio_on_the_vcpu_and_the_vm(
        child: Callable[[int, int], list[int]]) -> None:
    with KvmVm() as vm:
        vcpu = vm.create_vcpu(0)
        codes = child(vcpu.fd, vm.fd)
        get(vcpu)  # the owner still drives it
    assert codes == [errno.EIO, errno.EIO]


@needs_kvm
def test_sparse_vcpu_ids_round_trip() -> None:
    ids = (17, 19, 21)
    with KvmVm() as source, KvmVm() as dest:
        saved = {}
        for vcpu_id in ids:
            vcpu = source.create_vcpu(vcpu_id)
            vcpu.seed_state(SEED)
            saved[vcpu_id] = get(vcpu)
        unexplained = []
        for vcpu_id in reversed(ids):  # creation order is free
            vcpu = dest.create_vcpu(vcpu_id)
            vcpu.put(memoryview(saved[vcpu_id]))
            unexplained += [d for d in vcpu.compare(saved[vcpu_id], get(vcpu))
                            if not d.explained]
        assert unexplained == []
        assert sorted(dest.vcpus) == list(ids)
        with pytest.raises(DeviceError, match="exists already"):
            dest.create_vcpu(19)
        with pytest.raises(DeviceError, match="KVM_CAP_MAX_VCPU_ID"):
            dest.create_vcpu(dest.max_vcpu_id)


@needs_kvm
def test_vm_state_round_trips_with_only_timestamps_moving() -> None:
    with KvmVm() as source, KvmVm() as dest:
        source.create_vcpu(0)
        dest.create_vcpu(0)
        saved = source.get_state()
        dest.put_state(saved)
        old, new = source.parse_state(saved), dest.parse_state(dest.get_state())
    for chip in (VmSection.PIC_MASTER, VmSection.PIC_SLAVE, VmSection.IOAPIC):
        assert old[chip] == new[chip], chip.name
    pit_old = structs.kvm_pit_state2.from_buffer_copy(old[VmSection.PIT2])
    pit_new = structs.kvm_pit_state2.from_buffer_copy(new[VmSection.PIT2])
    for a, b in zip(pit_old.channels, pit_new.channels, strict=True):
        a.count_load_time = b.count_load_time = 0  # host ktime of the last load: moves
    assert bytes(pit_old) == bytes(pit_new)
    clock_old = structs.kvm_clock_data.from_buffer_copy(old[VmSection.CLOCK])
    clock_new = structs.kvm_clock_data.from_buffer_copy(new[VmSection.CLOCK])
    assert 0 <= clock_new.clock - clock_old.clock < 2 * 10**9  # ns, counting on
    assert list(VM_SAVE_ORDER)[-3:] == [VmSection.PIC_MASTER, VmSection.PIC_SLAVE,
                                       VmSection.IOAPIC]


@needs_kvm
def test_record_bytes_bounds_every_record() -> None:
    with KvmVm() as vm:
        vcpu = vm.create_vcpu(0)
        assert len(get(vcpu)) == vm.layout.record_bytes
        with pytest.raises(DeviceError, match="buffer of"):
            vcpu.get(memoryview(bytearray(vm.layout.record_bytes - 1)))


@needs_kvm
def test_per_vcpu_get_and_put_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """Measured and printed, not asserted: wall time of one get or put, per vCPU."""
    rounds, count = 100, 8
    with KvmVm() as vm:
        vcpus = [vm.create_vcpu(i) for i in range(count)]
        for vcpu in vcpus:
            vcpu.seed_state(SEED)
        slots = [memoryview(bytearray(vm.layout.record_bytes)) for _ in vcpus]
        get_us, put_us = [], []
        for _ in range(rounds):
            get_us.append(_per_vcpu_us(lambda v, s: v.get(s), vcpus, slots))
            put_us.append(_per_vcpu_us(lambda v, s: v.put(s), vcpus, slots))
    with capsys.disabled():
        print(f"\n  per vCPU over {rounds} rounds of {count} vCPUs: "
              f"get median {statistics.median(get_us):.1f} us (min {min(get_us):.1f}), "
              f"put median {statistics.median(put_us):.1f} us (min {min(put_us):.1f})")


def _per_vcpu_us(operation: Callable[[KvmVcpu, memoryview], object], vcpus: list[KvmVcpu],
                 slots: list[memoryview]) -> float:
    start = time.perf_counter_ns()
    for vcpu, slot in zip(vcpus, slots, strict=True):
        operation(vcpu, slot)
    return (time.perf_counter_ns() - start) / len(vcpus) / 1000
