"""The record of a ``kvm`` vCPU: its sections, their save and restore order, and its framing.

Record layout (little-endian), sim-vcpu's with its own magic so that neither backend loads
the other's records::

    header   magic u32 'KVMC' | version u16 | sections u16 | vcpu id u32 | reserved u32
    section  tag u16 | reserved u16 | length u32 | bytes[length]     (x 9, in SAVE_ORDER)

Each section holds the kernel struct exactly as its ``KVM_GET_*`` ioctl wrote it. SREGS
is ``kvm_sregs2`` where the host has ``KVM_CAP_SREGS2`` (tag SREGS2); XSAVE is as long as
``KVM_CAP_XSAVE2`` says; MSRS is one ``kvm_msrs`` holding every migrated MSR, the deferred
ones last. The sizes are fixed per VM (:class:`VcpuLayout`); a record from a VM with
another layout is refused, never half-loaded.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from devstate.devices.kvm import structs
from devstate.devices.kvm.uapi import Ioctl
from devstate.errors import DeviceError

MAGIC = int.from_bytes(b"KVMC", "little")
VERSION = 1
HEADER = struct.Struct("<IHHII")
SECTION = struct.Struct("<HHI")
MSRS_HEADER = struct.Struct("<II")


class Section(enum.IntEnum):
    """One part of a vCPU's state; tags 1-9 are sim-vcpu's, SREGS2 replaces SREGS."""

    MP_STATE = 1
    REGS = 2
    SREGS = 3
    XSAVE = 4
    XCRS = 5
    DEBUGREGS = 6
    LAPIC = 7
    MSRS = 8
    VCPU_EVENTS = 9
    SREGS2 = 10


# Save order (Firecracker arch/x86_64/vcpu.rs::save_state; SREGS means SREGS2 where the host
# has it). The VM must be stopped: VCPU_EVENTS is unsafe while other vCPUs still run.
SAVE_ORDER: tuple[Section, ...] = (
    Section.MP_STATE,     # first: KVM_GET_MP_STATE runs kvm_apic_accept_events(), which may
                          # change vCPU and LAPIC state that the later gets read
    Section.REGS,
    Section.SREGS,
    Section.XSAVE,
    Section.XCRS,
    Section.DEBUGREGS,
    Section.LAPIC,        # after MP_STATE: KVM_GET_LAPIC may change the LAPIC before returning it
    Section.MSRS,
    Section.VCPU_EVENTS,  # last: it may be affected by internal state changes of the other gets
)

# Restore order (Firecracker restore_state). CPUID comes before all of it, at vCPU creation:
# SET_XCRS and SET_XSAVE check against the guest's XCR0 derived from CPUID leaf 0xD.
RESTORE_ORDER: tuple[Section, ...] = (
    Section.MP_STATE,     # first: some set ioctls depend on kvm_vcpu_is_bsp()
    Section.REGS,         # before VCPU_EVENTS: SET_REGS clears pending exceptions
    Section.SREGS,        # before LAPIC: SET_SREGS restores apic_base; before VCPU_EVENTS:
                          # both carry a pending interrupt, and the events are the later word
    Section.XSAVE,
    Section.XCRS,
    Section.DEBUGREGS,
    Section.LAPIC,        # before MSRS: IA32_TSC_DEADLINE restores only with the LAPIC timer
                          # already in TSC-deadline mode
    Section.MSRS,         # in batches of <= 256, DEFERRED_MSRS last (msr_chunks)
    Section.VCPU_EVENTS,  # last: restores what SET_REGS cleared
)

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0

# MSRs set after all others, with why (Firecracker arch/x86_64/msr.rs, DEFERRED_MSRS).
DEFERRED_MSRS: Mapping[int, str] = {
    MSR_IA32_TSC_DEADLINE: "after IA32_TSC: the deadline is a TSC value, and setting it "
                           "against the old TSC can fire the timer early or lose it",
}

# Names for messages and differences; an MSR not listed shows as its index.
MSR_NAMES: Mapping[int, str] = {
    0x10: "IA32_TSC", 0x11: "KVM_WALL_CLOCK", 0x12: "KVM_SYSTEM_TIME", 0x34: "SMI_COUNT",
    0x3B: "IA32_TSC_ADJUST", 0x8B: "IA32_UCODE_REV", 0xCE: "PLATFORM_INFO",
    0x10A: "IA32_ARCH_CAPABILITIES", 0x140: "MISC_FEATURES_ENABLES",
    0x174: "IA32_SYSENTER_CS", 0x175: "IA32_SYSENTER_ESP", 0x176: "IA32_SYSENTER_EIP",
    0x17A: "IA32_MCG_STATUS", 0x17B: "IA32_MCG_CTL", 0x1A0: "IA32_MISC_ENABLE",
    0x1D9: "IA32_DEBUGCTL", 0x1DB: "LASTBRANCHFROMIP", 0x1DC: "LASTBRANCHTOIP",
    0x1DD: "LASTINTFROMIP", 0x1DE: "LASTINTTOIP", 0x1FC: "IA32_POWER_CTL",
    0x277: "IA32_PAT", 0x345: "IA32_PERF_CAPABILITIES", 0x6E0: "IA32_TSC_DEADLINE",
    0xC0000081: "STAR", 0xC0000082: "LSTAR", 0xC0000083: "CSTAR", 0xC0000084: "SFMASK",
    0xC0000102: "KERNEL_GS_BASE", 0xC0010015: "AMD64_HWCR", 0xC0010117: "VM_HSAVE_PA",
    0xC001011F: "AMD64_DE_CFG", 0x4B564D00: "KVM_WALL_CLOCK_NEW",
    0x4B564D01: "KVM_SYSTEM_TIME_NEW", 0x4B564D02: "KVM_ASYNC_PF_EN",
    0x4B564D03: "KVM_STEAL_TIME", 0x4B564D04: "KVM_PV_EOI_EN", 0x4B564D05: "KVM_POLL_CONTROL",
    0x4B564D06: "KVM_ASYNC_PF_INT", 0x4B564D07: "KVM_ASYNC_PF_ACK",
}


def msr_name(index: int) -> str:
    """An MSR's architectural name, or its index in hex."""
    return MSR_NAMES.get(index, f"MSR_{index:#x}")


# ---------------------------------------------------------------------------- the layout


@dataclass(frozen=True, slots=True)
class XsaveComponent:
    """An XSAVE state component in the standard format (host CPUID leaf 0xD)."""

    feature: int  # its XCR0 bit
    offset: int  # CPUID.(0xD, feature).EBX
    size: int  # CPUID.(0xD, feature).EAX


@dataclass(frozen=True, slots=True)
class VcpuLayout:
    """The shape of a vCPU record on one VM: which ioctls, which MSRs, which sizes.

    Every vCPU of a VM shares it, and both sides of a migration must have the same one.
    """

    sregs2: bool  # KVM_CAP_SREGS2: SREGS2 instead of SREGS
    xsave2: bool  # KVM_CAP_XSAVE2 > 0: KVM_GET_XSAVE2 instead of KVM_GET_XSAVE
    xsave_size: int  # bytes of the XSAVE section
    msr_chunks: tuple[tuple[int, ...], ...]  # KVM_SET_MSRS batches, deferred MSRs last
    xsave_components: tuple[XsaveComponent, ...] = ()
    tsc_deadline: bool = False  # the guest CPUID has the LAPIC TSC-deadline timer

    @property
    def msr_indices(self) -> tuple[int, ...]:
        """Every migrated MSR, in record order."""
        return tuple(index for chunk in self.msr_chunks for index in chunk)

    def resolve(self, section: Section) -> Section:
        """The section that stands for ``section`` here: SREGS becomes SREGS2 if supported."""
        return Section.SREGS2 if section is Section.SREGS and self.sregs2 else section

    def section_bytes(self, section: Section) -> int:
        """The length of ``section`` in a record."""
        if section is Section.XSAVE:
            return self.xsave_size
        if section is Section.MSRS:
            return MSRS_HEADER.size + ctypes.sizeof(structs.kvm_msr_entry) * len(self.msr_indices)
        return ctypes.sizeof(STRUCTS[section])

    @property
    def sections(self) -> tuple[Section, ...]:
        """The sections of a record, in SAVE_ORDER."""
        return tuple(self.resolve(s) for s in SAVE_ORDER)

    def payload_offsets(self) -> dict[Section, int]:
        """Where each section's payload starts in a record (after its section header)."""
        offsets, pos = {}, HEADER.size
        for section in self.sections:
            offsets[section] = pos + SECTION.size
            pos += SECTION.size + self.section_bytes(section)
        return offsets

    @property
    def record_bytes(self) -> int:
        """The exact length of every record of this layout."""
        return HEADER.size + sum(SECTION.size + self.section_bytes(s) for s in self.sections)


STRUCTS: Mapping[Section, type[ctypes.Structure]] = {
    Section.MP_STATE: structs.kvm_mp_state,
    Section.REGS: structs.kvm_regs,
    Section.SREGS: structs.kvm_sregs,
    Section.SREGS2: structs.kvm_sregs2,
    Section.XSAVE: structs.kvm_xsave,
    Section.XCRS: structs.kvm_xcrs,
    Section.DEBUGREGS: structs.kvm_debugregs,
    Section.LAPIC: structs.kvm_lapic_state,
    Section.MSRS: structs.kvm_msrs,
    Section.VCPU_EVENTS: structs.kvm_vcpu_events,
}

GET_IOCTL: Mapping[Section, Ioctl] = {
    Section.MP_STATE: Ioctl.KVM_GET_MP_STATE,
    Section.REGS: Ioctl.KVM_GET_REGS,
    Section.SREGS: Ioctl.KVM_GET_SREGS,
    Section.SREGS2: Ioctl.KVM_GET_SREGS2,
    Section.XSAVE: Ioctl.KVM_GET_XSAVE,
    Section.XCRS: Ioctl.KVM_GET_XCRS,
    Section.DEBUGREGS: Ioctl.KVM_GET_DEBUGREGS,
    Section.LAPIC: Ioctl.KVM_GET_LAPIC,
    Section.MSRS: Ioctl.KVM_GET_MSRS,
    Section.VCPU_EVENTS: Ioctl.KVM_GET_VCPU_EVENTS,
}

SET_IOCTL: Mapping[Section, Ioctl] = {
    Section.MP_STATE: Ioctl.KVM_SET_MP_STATE,
    Section.REGS: Ioctl.KVM_SET_REGS,
    Section.SREGS: Ioctl.KVM_SET_SREGS,
    Section.SREGS2: Ioctl.KVM_SET_SREGS2,
    Section.XSAVE: Ioctl.KVM_SET_XSAVE,  # takes the KVM_CAP_XSAVE2 size too
    Section.XCRS: Ioctl.KVM_SET_XCRS,
    Section.DEBUGREGS: Ioctl.KVM_SET_DEBUGREGS,
    Section.LAPIC: Ioctl.KVM_SET_LAPIC,
    Section.MSRS: Ioctl.KVM_SET_MSRS,
    Section.VCPU_EVENTS: Ioctl.KVM_SET_VCPU_EVENTS,
}


# ----------------------------------------------------------------------- record framing


def parse_record(data: memoryview, device: str, magic: int, record_id: int,
                 expected: Sequence[tuple[enum.IntEnum, int]]) -> dict[int, memoryview]:
    """Split a header+sections record into its sections, checking every length and tag.

    ``expected`` lists (tag, length) in record order; the record must match it exactly.
    """
    if len(data) < HEADER.size:
        raise DeviceError(device, f"record of {len(data)} B is shorter than a header")
    got_magic, version, count, got_id, _ = HEADER.unpack_from(data, 0)
    if got_magic != magic:
        raise DeviceError(device, f"bad record magic {got_magic:#x}")
    if version != VERSION:
        raise DeviceError(device, f"record version {version} is not {VERSION}")
    if got_id != record_id:
        raise DeviceError(device, f"record is for id {got_id}, not {record_id}")
    if count != len(expected):
        raise DeviceError(device, f"record has {count} sections, not {len(expected)}")
    found: dict[int, memoryview] = {}
    pos = HEADER.size
    for tag, length in expected:
        if pos + SECTION.size > len(data):
            raise DeviceError(device, f"record truncated before {tag.name}")
        got_tag, _, got_length = SECTION.unpack_from(data, pos)
        pos += SECTION.size
        if got_tag != tag or got_length != length:
            raise DeviceError(device, f"section {got_tag} of {got_length} B where "
                                      f"{tag.name} of {length} B belongs")
        if pos + length > len(data):
            raise DeviceError(device, f"record truncated inside {tag.name}")
        found[tag] = data[pos:pos + length]
        pos += length
    if pos != len(data):
        raise DeviceError(device, f"{len(data) - pos} B after the last section")
    return found


def write_section(out: memoryview, pos: int, tag: int, payload: memoryview) -> int:
    """Frame ``payload`` as section ``tag`` at ``pos``; return the position after it."""
    SECTION.pack_into(out, pos, tag, 0, len(payload))
    pos += SECTION.size
    out[pos:pos + len(payload)] = payload
    return pos + len(payload)


def bytes_of(obj: ctypes.Structure) -> memoryview:
    """A writable byte view of a ctypes object (it keeps the object alive)."""
    return memoryview(obj).cast("B")


def batched(indices: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """``indices`` in order, at most KVM_MAX_MSR_ENTRIES a batch."""
    size = structs.KVM_MAX_MSR_ENTRIES
    return tuple(tuple(indices[at:at + size]) for at in range(0, len(indices), size))


def msr_chunks(indices: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The KVM_SET_MSRS batches: list order with the deferred MSRs moved last.

    KVM writes a batch's entries in array order (msr_io stops at the first one refused), so
    a deferred MSR at the end of the last batch is set after every other, as a call of its
    own would set it; and one call less is one vcpu_load less per vCPU, the costliest part
    of a KVM vCPU ioctl on a nested host (perf: ~half of a put's ioctl time).
    """
    regular = [i for i in indices if i not in DEFERRED_MSRS]
    deferred = [i for i in indices if i in DEFERRED_MSRS]
    return batched(regular + deferred)
