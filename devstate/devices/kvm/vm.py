"""A KVM VM owned by this process: its fds, what it learned about the host, its vCPUs, and
its VM-level state (PIT, kvmclock, PIC and IOAPIC).

Runs in: the process that creates it, which is the only one KVM lets drive it (every VM
or vCPU ioctl from another process fails with EIO; ARCHITECTURE.md section 3).

Setting up follows what a VMM does before its first vCPU (Firecracker
``arch_pre_create_vcpus``, shared/reference/kvm-vcpu-state.md): check the API version and
the capabilities migration needs, create the in-kernel irqchip (``KVM_CREATE_IRQCHIP``
fails once a vCPU exists) and the PIT, and read ``KVM_GET_SUPPORTED_CPUID``, which every
vCPU gets before anything else. No guest memory is mapped: nothing here runs a vCPU, and
no state that is got or put reads guest memory (long-mode CR3 is not walked on SET_SREGS,
SREGS2 carries the PAE PDPTRs, and the kvmclock/async-PF MSRs keep the values KVM gives).

The MSRs a vCPU migrates are those of ``KVM_GET_MSR_INDEX_LIST`` that a scratch vCPU of a
throwaway VM, with the same CPUID, really reads and writes back; the others are kept in
:attr:`KvmVm.dropped_msrs` with the reason. A scratch VM because KVM cannot destroy a vCPU,
and any id the probe took would be one the caller cannot have.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

from devstate.devices.kvm import structs, uapi
from devstate.devices.kvm.ram import PAGE_BYTES, GuestRam
from devstate.devices.kvm.record import (
    HEADER,
    SECTION,
    VERSION,
    VcpuLayout,
    XsaveComponent,
    msr_chunks,
    parse_record,
    write_section,
)
from devstate.devices.kvm.structs import IrqchipId
from devstate.devices.kvm.uapi import Cap, Ioctl, IoctlFn, KvmError
from devstate.devices.kvm.vcpu import KvmVcpu
from devstate.errors import DeviceError

KVM_DEVICE = "/dev/kvm"
VM_MAGIC = int.from_bytes(b"KVMV", "little")
# Firecracker's KVM_MAX_CPUID_ENTRIES: the first guess for KVM_GET_SUPPORTED_CPUID's nent.
CPUID_ENTRIES_GUESS = 80
_CPUID_ENTRIES_LIMIT = 4096
_CPUID_1_ECX_TSC_DEADLINE = 1 << 24
_XSAVE_LEAF = 0xD
# Guest-physical [3 GiB, 4 GiB) holds no RAM: KVM emulates the LAPIC (0xFEE00000) and the
# IOAPIC (0xFEC00000) only where no memslot covers the address, so RAM beyond 3 GiB goes on
# at 4 GiB, as a PC's does (QEMU's below_4g_mem_size).
RAM_HOLE_START = 3 << 30
RAM_HOLE_END = 4 << 30

# What migrating a vCPU and the VM-level state needs from KVM.
REQUIRED_CAPS: Mapping[Cap, str] = {
    Cap.IRQCHIP: "an in-kernel LAPIC, PIC and IOAPIC",
    Cap.PIT2: "an in-kernel PIT (KVM_CREATE_PIT2)",
    Cap.PIT_STATE2: "KVM_GET/SET_PIT2",
    Cap.ADJUST_CLOCK: "KVM_GET/SET_CLOCK",
    Cap.MP_STATE: "KVM_GET/SET_MP_STATE",
    Cap.VCPU_EVENTS: "KVM_GET/SET_VCPU_EVENTS",
    Cap.DEBUGREGS: "KVM_GET/SET_DEBUGREGS",
    Cap.XSAVE: "KVM_GET/SET_XSAVE",
    Cap.XCRS: "KVM_GET/SET_XCRS",
}


class VmSection(enum.IntEnum):
    """One part of the VM-level state."""

    PIT2 = 1
    CLOCK = 2
    PIC_MASTER = 3
    PIC_SLAVE = 4
    IOAPIC = 5


# Firecracker's order (arch/x86_64/vm.rs save_state/restore_state); devstate knows of no
# constraint among these. All of them load before any vCPU: a coordinator rule.
VM_SAVE_ORDER: tuple[VmSection, ...] = (
    VmSection.PIT2, VmSection.CLOCK,
    VmSection.PIC_MASTER, VmSection.PIC_SLAVE, VmSection.IOAPIC)
VM_RESTORE_ORDER: tuple[VmSection, ...] = VM_SAVE_ORDER


@dataclass(frozen=True, slots=True)
class _VmPart:
    ctype: type[ctypes.Structure]
    get: Ioctl
    set: Ioctl
    chip: IrqchipId | None = None  # which chip a kvm_irqchip carries


_VM_PARTS: Mapping[VmSection, _VmPart] = {
    VmSection.PIT2: _VmPart(structs.kvm_pit_state2, Ioctl.KVM_GET_PIT2, Ioctl.KVM_SET_PIT2),
    # Saved with the flags KVM reported: on set, KVM_CLOCK_REALTIME advances the clock by
    # the wall time since the save, and is honoured only if the save had it.
    VmSection.CLOCK: _VmPart(structs.kvm_clock_data, Ioctl.KVM_GET_CLOCK, Ioctl.KVM_SET_CLOCK),
    **{section: _VmPart(structs.kvm_irqchip, Ioctl.KVM_GET_IRQCHIP, Ioctl.KVM_SET_IRQCHIP, chip)
       for section, chip in ((VmSection.PIC_MASTER, IrqchipId.PIC_MASTER),
                             (VmSection.PIC_SLAVE, IrqchipId.PIC_SLAVE),
                             (VmSection.IOAPIC, IrqchipId.IOAPIC))},
}

def vm_state_bytes(sections: tuple[VmSection, ...] = VM_SAVE_ORDER) -> int:
    """The length of a VM-state record holding ``sections``."""
    return HEADER.size + sum(SECTION.size + ctypes.sizeof(_VM_PARTS[s].ctype) for s in sections)


# Fields the kernel changes by itself between a set and a get, as (section, offset, size):
# a PIT channel's count_load_time is the host time of the set (24-byte channels, field at
# 16); the clock's value, wall time and host TSC advance, and its flags reflect the host.
VOLATILE_FIELDS: tuple[tuple[VmSection, int, int], ...] = (
    *((VmSection.PIT2, 24 * channel + 16, 8) for channel in range(3)),
    (VmSection.CLOCK, 0, 16), (VmSection.CLOCK, 16, 16))


@dataclass(frozen=True, slots=True)
class RamSlot:
    """A KVM memory slot: guest-physical ``[guest_phys_addr, + size)`` is the guest RAM's
    bytes ``[offset, offset + size)``."""

    slot: int
    guest_phys_addr: int
    offset: int
    size: int


class KvmVm:
    """A KVM VM with an in-kernel irqchip and PIT, and the vCPUs created in it."""

    def __init__(self, *, ioctl: IoctlFn = uapi.ioctl, name: str = "kvm") -> None:
        self.name = name
        self.vcpus: dict[int, KvmVcpu] = {}
        self.dropped_msrs: dict[int, str] = {}
        self.ram_slots: tuple[RamSlot, ...] = ()
        self._ram_address = 0
        self._ioctl = ioctl
        self._kvm_fd = self._vm_fd = -1
        try:
            self._kvm_fd = self._open_kvm()
            self._check_host()
            self._vm_fd = self._create_vm()
            self.max_vcpus = self._check(Cap.MAX_VCPUS)
            self.max_vcpu_id = self._check(Cap.MAX_VCPU_ID) or self.max_vcpus
            self._cpuid = self._guest_cpuid()
            self.layout = self._probe_layout()
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------------

    def _open_kvm(self) -> int:
        try:
            return os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(self.name, f"open {KVM_DEVICE}", exc.errno or errno.EIO) from exc

    def _check(self, cap: Cap, fd: int | None = None) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm, or on a VM fd where the answer is per VM."""
        return self._ioctl(self._kvm_fd if fd is None else fd, Ioctl.KVM_CHECK_EXTENSION, cap,
                           device=self.name)

    def _check_host(self) -> None:
        version = self._ioctl(self._kvm_fd, Ioctl.KVM_GET_API_VERSION, device=self.name)
        if version != uapi.KVM_API_VERSION:
            raise DeviceError(self.name, f"KVM API version {version}, devstate speaks "
                                         f"{uapi.KVM_API_VERSION}")
        for cap, what in REQUIRED_CAPS.items():
            if not self._check(cap):
                raise DeviceError(self.name, f"KVM lacks KVM_CAP_{cap.name}: {what}")

    def _create_vm(self) -> int:
        """A VM fd with the in-kernel irqchip and PIT, created before any vCPU as KVM needs."""
        vm_fd = self._ioctl(self._kvm_fd, Ioctl.KVM_CREATE_VM, 0, device=self.name)
        try:
            self._ioctl(vm_fd, Ioctl.KVM_CREATE_IRQCHIP, device=self.name)
            # The speaker port is a dummy, as in QEMU and Firecracker: no audio device.
            pit = structs.kvm_pit_config(flags=structs.KVM_PIT_SPEAKER_DUMMY)
            self._ioctl(vm_fd, Ioctl.KVM_CREATE_PIT2, pit, device=self.name)
        except BaseException:
            os.close(vm_fd)
            raise
        return vm_fd

    def _guest_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID, with the TSC-deadline timer the in-kernel LAPIC emulates."""
        cpuid = self._supported_cpuid()
        if self._check(Cap.TSC_DEADLINE_TIMER):
            # KVM may leave it out of the supported table; QEMU adds it the same way.
            for entry in cpuid.entries:
                if entry.function == 1:
                    entry.ecx |= _CPUID_1_ECX_TSC_DEADLINE
        return cpuid

    def _supported_cpuid(self) -> ctypes.Structure:
        # E2BIG means nent was too small; KVM does not say how many it needs, so grow.
        nent = CPUID_ENTRIES_GUESS
        while True:
            cpuid = structs.cpuid2_type(nent)()
            cpuid.nent = nent
            try:
                self._ioctl(self._kvm_fd, Ioctl.KVM_GET_SUPPORTED_CPUID, cpuid, device=self.name)
            except KvmError as exc:
                if exc.errno != errno.E2BIG or nent >= _CPUID_ENTRIES_LIMIT:
                    raise
                nent *= 2
                continue
            # Keep only the entries KVM filled in: it set nent to their count.
            return structs.cpuid2_type(cpuid.nent).from_buffer_copy(cpuid)

    def _msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: asked with room for none, KVM answers E2BIG and the count."""
        probe = structs.msr_list_type(0)()
        try:
            self._ioctl(self._kvm_fd, Ioctl.KVM_GET_MSR_INDEX_LIST, probe, device=self.name)
            return []
        except KvmError as exc:
            if exc.errno != errno.E2BIG:
                raise
        listing = structs.msr_list_type(probe.nmsrs)()
        listing.nmsrs = probe.nmsrs
        self._ioctl(self._kvm_fd, Ioctl.KVM_GET_MSR_INDEX_LIST, listing, device=self.name)
        return list(listing.indices[:listing.nmsrs])

    def _probe_layout(self) -> VcpuLayout:
        xsave2 = self._check(Cap.XSAVE2, self._vm_fd)  # per VM: dynamic features count
        return VcpuLayout(
            sregs2=bool(self._check(Cap.SREGS2)),
            xsave2=xsave2 > 0,
            xsave_size=max(xsave2, ctypes.sizeof(structs.kvm_xsave)),
            msr_chunks=msr_chunks(self._usable_msrs(self._msr_index_list())),
            xsave_components=_xsave_components(self._cpuid),
            tsc_deadline=any(e.function == 1 and e.ecx & _CPUID_1_ECX_TSC_DEADLINE
                             for e in self._cpuid.entries),
        )

    def _usable_msrs(self, indices: list[int]) -> list[int]:
        """The listed MSRs a scratch vCPU reads and writes back; the rest go to dropped_msrs."""
        scratch_vm = self._create_vm()
        try:
            vcpu_fd = self._ioctl(scratch_vm, Ioctl.KVM_CREATE_VCPU, 0, device=self.name)
            try:
                self._ioctl(vcpu_fd, Ioctl.KVM_SET_CPUID2, self._cpuid, device=self.name)
                return [i for i in indices if self._msr_round_trips(vcpu_fd, i)]
            finally:
                os.close(vcpu_fd)
        finally:
            os.close(scratch_vm)

    def _msr_round_trips(self, vcpu_fd: int, index: int) -> bool:
        one = structs.msrs_type(1)()
        one.nmsrs, one.entries[0].index = 1, index
        # Both ioctls return how many MSRs they processed: 0 means KVM refused this one.
        if self._ioctl(vcpu_fd, Ioctl.KVM_GET_MSRS, one, device=self.name) != 1:
            self.dropped_msrs[index] = "KVM_GET_MSRS refuses it on this host and CPUID"
            return False
        if self._ioctl(vcpu_fd, Ioctl.KVM_SET_MSRS, one, device=self.name) != 1:
            self.dropped_msrs[index] = "KVM_SET_MSRS refuses the value KVM_GET_MSRS gave"
            return False
        return True

    @property
    def fd(self) -> int:
        """The VM fd (-1 once closed)."""
        return self._vm_fd

    def map_ram(self, ram: GuestRam, *, log_dirty: bool = False) -> tuple[RamSlot, ...]:
        """Give ``ram`` to the guest from guest-physical 0 (slot 0), any part beyond 3 GiB
        from 4 GiB (slot 1); ``log_dirty`` has KVM log the pages the guest writes.

        ``ram`` must outlive the VM: KVM keeps the mapping's address, not the pages.
        """
        if self.ram_slots:
            raise DeviceError(self.name, "guest RAM is mapped already")
        low = min(ram.size, RAM_HOLE_START)
        slots = [RamSlot(0, 0, 0, low)]
        if ram.size > low:
            slots.append(RamSlot(1, RAM_HOLE_END, low, ram.size - low))
        self._ram_address = ram.address
        self.ram_slots = tuple(slots)
        self.log_dirty(log_dirty)
        return self.ram_slots

    def log_dirty(self, on: bool) -> None:
        """Start or stop KVM's dirty log of every RAM slot (the slots are registered again
        with or without KVM_MEM_LOG_DIRTY_PAGES, as QEMU does when a migration starts and
        ends). Starting makes the next :meth:`dirty_log` hold what is written from now."""
        flags = structs.MemFlag.LOG_DIRTY_PAGES if on else structs.MemFlag(0)
        for slot in self.ram_slots:
            region = structs.kvm_userspace_memory_region(
                slot=slot.slot, flags=flags, guest_phys_addr=slot.guest_phys_addr,
                memory_size=slot.size, userspace_addr=self._ram_address + slot.offset)
            self._ioctl(self._vm_fd, Ioctl.KVM_SET_USER_MEMORY_REGION, region,
                        device=self.name)

    def dirty_log(self, slot: RamSlot, bitmap: npt.NDArray[np.uint64]) -> None:
        """Fetch and clear ``slot``'s dirty log into ``bitmap`` (a bit per page, page k of the
        slot in bit k % 64 of word k // 64, as KVM_GET_DIRTY_LOG writes it); the slot must
        be logging (:meth:`log_dirty`)."""
        if bitmap.size * 64 < slot.size // PAGE_BYTES or not bitmap.flags.c_contiguous:
            raise DeviceError(self.name, f"a dirty bitmap of {bitmap.size} words cannot hold "
                                         f"slot {slot.slot}'s {slot.size // PAGE_BYTES} pages")
        log = structs.kvm_dirty_log(slot=slot.slot, dirty_bitmap=bitmap.ctypes.data)
        self._ioctl(self._vm_fd, Ioctl.KVM_GET_DIRTY_LOG, log, device=self.name)

    # -- vCPUs ----------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        """Create vCPU ``vcpu_id`` (any id below max_vcpu_id) and set its CPUID first."""
        if vcpu_id in self.vcpus:
            raise DeviceError(self.name, f"vCPU {vcpu_id} exists already")
        if not 0 <= vcpu_id < self.max_vcpu_id:
            raise DeviceError(self.name, f"vCPU id {vcpu_id} is outside 0..{self.max_vcpu_id - 1}"
                                         " (KVM_CAP_MAX_VCPU_ID)")
        if len(self.vcpus) >= self.max_vcpus:
            raise DeviceError(self.name, f"a VM holds at most {self.max_vcpus} vCPUs "
                                         "(KVM_CAP_MAX_VCPUS)")
        device = f"cpu/{vcpu_id}"
        fd = self._ioctl(self._vm_fd, Ioctl.KVM_CREATE_VCPU, vcpu_id, device=device)
        try:
            # Before anything else: XCR0 and XSAVE are checked against CPUID leaf 0xD.
            self._ioctl(fd, Ioctl.KVM_SET_CPUID2, self._cpuid, device=device)
        except BaseException:
            os.close(fd)
            raise
        vcpu = KvmVcpu(fd, vcpu_id, self.layout, ioctl=self._ioctl)
        self.vcpus[vcpu_id] = vcpu
        return vcpu

    # -- VM-level state -------------------------------------------------------------

    def close_vcpu(self, vcpu_id: int) -> None:
        """Close one vCPU and forget it (its id may be created again). Idempotent."""
        vcpu = self.vcpus.pop(vcpu_id, None)
        if vcpu is not None:
            vcpu.close()

    def get_state(self, sections: tuple[VmSection, ...] = VM_SAVE_ORDER) -> bytes:
        """VM-level state as one record: ``sections`` (a subset of VM_SAVE_ORDER), in order."""
        record = bytearray(vm_state_bytes(sections))
        out = memoryview(record)
        HEADER.pack_into(out, 0, VM_MAGIC, VERSION, len(sections), 0, 0)
        pos = HEADER.size
        for section in sections:
            part = _VM_PARTS[section]
            state = part.ctype()
            if part.chip is not None:
                state.chip_id = part.chip
            self._ioctl(self._vm_fd, part.get, state, device=self.name)
            pos = write_section(out, pos, section, memoryview(state).cast("B"))
        return bytes(record)

    def parse_state(self, record: bytes | bytearray | memoryview,
                    sections: tuple[VmSection, ...] = VM_SAVE_ORDER) -> dict[int, memoryview]:
        """A VM-state record's sections by tag, after checking its header and lengths."""
        expected = [(s, ctypes.sizeof(_VM_PARTS[s].ctype)) for s in sections]
        return parse_record(memoryview(record), self.name, VM_MAGIC, 0, expected)

    def put_state(self, data: bytes | memoryview,
                  sections: tuple[VmSection, ...] = VM_SAVE_ORDER) -> None:
        """Load a record made by :meth:`get_state` with the same ``sections``, in order."""
        parsed = self.parse_state(data, sections)
        for section in sections:
            part = _VM_PARTS[section]
            state = part.ctype.from_buffer_copy(parsed[section])
            if part.chip is not None and state.chip_id != part.chip:
                raise DeviceError(self.name, f"put: {section.name} section carries chip "
                                             f"{state.chip_id}")
            self._ioctl(self._vm_fd, part.set, state, device=self.name)

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close every vCPU, the VM and /dev/kvm. Idempotent; safe after a failed start.

        KVM frees the VM when its last fd closes, vCPU fds included.
        """
        for vcpu in self.vcpus.values():
            vcpu.close()
        for attr in ("_vm_fd", "_kvm_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _xsave_components(cpuid: ctypes.Structure) -> tuple[XsaveComponent, ...]:
    """The user state components the guest may enable, with their standard-format place.

    CPUID leaf 0xD: subleaf 0 EDX:EAX is the XCR0 mask, subleaf i >= 2 gives component i's
    size (EAX) and offset (EBX). Components 0 and 1 (x87, SSE) live in the legacy region.
    """
    leaves = {e.index: e for e in cpuid.entries if e.function == _XSAVE_LEAF}
    if 0 not in leaves:
        return ()
    xcr0 = leaves[0].eax | leaves[0].edx << 32
    return tuple(XsaveComponent(i, leaves[i].ebx, leaves[i].eax)
                 for i in sorted(leaves) if i >= 2 and xcr0 >> i & 1 and leaves[i].eax)
