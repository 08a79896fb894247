"""``kvm`` vCPUs: one real KVM vCPU's state as a record, got and put in KVM's order.

Runs in: the process that created the vCPU's VM (the owner rule); any thread of it, one
caller per vCPU at a time (each :class:`KvmVcpu` reuses its own ctypes buffers, and KVM
serialises a vCPU's ioctls anyway). Different vCPUs may be driven from different threads:
:func:`devstate.devices.kvm.uapi.ioctl` releases the GIL for the call.

Record layout (little-endian), sim-vcpu's with its own magic so that neither backend loads
the other's records::

    header   magic u32 'KVMC' | version u16 | sections u16 | vcpu id u32 | reserved u32
    section  tag u16 | reserved u16 | length u32 | bytes[length]     (x 9, in SAVE_ORDER)

Each section holds the kernel struct exactly as its ``KVM_GET_*`` ioctl wrote it. SREGS
is ``kvm_sregs2`` where the host has ``KVM_CAP_SREGS2`` (tag SREGS2); XSAVE is as long as
``KVM_CAP_XSAVE2`` says; MSRS is one ``kvm_msrs`` holding every migrated MSR, the deferred
ones last. The sizes are fixed per VM (:class:`VcpuLayout`); a record from a VM with
another layout is refused, never half-loaded.

Besides get and put: :meth:`KvmVcpu.seed_state` gives a vCPU distinct contents KVM
accepts, and :meth:`KvmVcpu.compare` checks a readback against what was saved, field by
field, with the fields the kernel legitimately changes listed in :data:`TOLERANCES`.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from devstate.devices.kvm import uapi
from devstate.devices.kvm.uapi import Ioctl, IoctlFn, MpState
from devstate.errors import DeviceError

if TYPE_CHECKING:
    from devstate.devices.kvm.vm import KvmVm

MAGIC = int.from_bytes(b"KVMC", "little")
VERSION = 1
HEADER = struct.Struct("<IHHII")
SECTION = struct.Struct("<HHI")
_MSRS_HEADER = struct.Struct("<II")


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
    Section.MSRS,         # in chunks, DEFERRED_MSRS in the last ones
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
    msr_chunks: tuple[tuple[int, ...], ...]  # KVM_SET_MSRS batches, deferred ones last
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
            return _MSRS_HEADER.size + ctypes.sizeof(uapi.kvm_msr_entry) * len(self.msr_indices)
        return ctypes.sizeof(_STRUCTS[section])

    @property
    def sections(self) -> tuple[Section, ...]:
        """The sections of a record, in SAVE_ORDER."""
        return tuple(self.resolve(s) for s in SAVE_ORDER)

    @property
    def record_bytes(self) -> int:
        """The exact length of every record of this layout."""
        return HEADER.size + sum(SECTION.size + self.section_bytes(s) for s in self.sections)


def record_bytes(vm: KvmVm) -> int:
    """The size of an arena slot that holds any vCPU record of ``vm`` (all are this long)."""
    return vm.layout.record_bytes


_STRUCTS: Mapping[Section, type[ctypes.Structure]] = {
    Section.MP_STATE: uapi.kvm_mp_state,
    Section.REGS: uapi.kvm_regs,
    Section.SREGS: uapi.kvm_sregs,
    Section.SREGS2: uapi.kvm_sregs2,
    Section.XSAVE: uapi.kvm_xsave,
    Section.XCRS: uapi.kvm_xcrs,
    Section.DEBUGREGS: uapi.kvm_debugregs,
    Section.LAPIC: uapi.kvm_lapic_state,
    Section.MSRS: uapi.kvm_msrs,
    Section.VCPU_EVENTS: uapi.kvm_vcpu_events,
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


def _bytes_of(obj: ctypes.Structure) -> memoryview:
    """A writable byte view of a ctypes object (it keeps the object alive)."""
    return memoryview(obj).cast("B")


# ---------------------------------------------------------------------------- the vCPU


class KvmVcpu:
    """One KVM vCPU, held by the process that created its VM."""

    def __init__(self, fd: int, vcpu_id: int, layout: VcpuLayout, *,
                 ioctl: IoctlFn = uapi.ioctl) -> None:
        self.fd = fd
        self.vcpu_id = vcpu_id
        self.layout = layout
        self.id = f"cpu/{vcpu_id}"
        self._ioctl = ioctl
        self._save = layout.sections
        self._record_bytes = layout.record_bytes  # layout properties compute; these are hot
        self._expected = [(s, layout.section_bytes(s)) for s in self._save]
        self._msr_indices = layout.msr_indices
        self._msrs_bytes = layout.section_bytes(Section.MSRS)
        self._restore = tuple(layout.resolve(s) for s in RESTORE_ORDER)
        self._get_ioctl = dict(GET_IOCTL)
        if layout.xsave2:
            self._get_ioctl[Section.XSAVE] = Ioctl.KVM_GET_XSAVE2
        # One reusable buffer per section: a get or put allocates nothing.
        self._buffers = {s: self._new_buffer(s) for s in self._save if s is not Section.MSRS}
        self._views = {s: _bytes_of(b) for s, b in self._buffers.items()}
        # Reads have no order among MSRs, so a get reads them in as few batches as KVM
        # takes: each vCPU ioctl costs a vcpu_load/vcpu_put (~8 us on a nested host).
        self._msr_reads = _msr_batches(_batched(layout.msr_indices))
        self._msr_writes = _msr_batches(layout.msr_chunks)
        self._msr_index_reader = struct.Struct("<" + "I12x" * len(self._msr_indices))
        self._closed = False

    def _new_buffer(self, section: Section) -> ctypes.Structure:
        if section is Section.XSAVE:
            return uapi.xsave_type(self.layout.xsave_size)()
        return _STRUCTS[section]()

    # -- get ------------------------------------------------------------------------

    def get(self, out: memoryview) -> int:
        """Read the vCPU's state from KVM into ``out``, in SAVE_ORDER; return its length.

        The VM must be stopped (no vCPU in KVM_RUN).
        """
        size = self._record_bytes
        if len(out) < size:
            raise DeviceError(self.id, f"get: buffer of {len(out)} B < record {size} B")
        HEADER.pack_into(out, 0, MAGIC, VERSION, len(self._save), self.vcpu_id, 0)
        pos = HEADER.size
        for section in self._save:
            if section is Section.MSRS:
                pos = self._get_msrs(out, pos)
            else:
                self._ioctl(self.fd, self._get_ioctl[section], self._buffers[section],
                            device=self.id)
                pos = write_section(out, pos, section, self._views[section])
        return pos

    def _get_msrs(self, out: memoryview, pos: int) -> int:
        SECTION.pack_into(out, pos, Section.MSRS, 0, self._msrs_bytes)
        pos += SECTION.size
        _MSRS_HEADER.pack_into(out, pos, len(self._msr_indices), 0)
        pos += _MSRS_HEADER.size
        for chunk, entries in self._msr_reads:
            done = self._ioctl(self.fd, Ioctl.KVM_GET_MSRS, chunk, device=self.id)
            self._check_msr_batch("KVM_GET_MSRS", chunk, done)
            out[pos:pos + len(entries)] = entries
            pos += len(entries)
        return pos

    # -- put ------------------------------------------------------------------------

    def put(self, data: memoryview) -> None:
        """Load a record made by :meth:`get` on a VM of the same layout, in RESTORE_ORDER."""
        sections = self.parse(data)
        self._check_msr_indices(sections[Section.MSRS])  # refuse before loading anything
        for section in self._restore:
            if section is Section.MSRS:
                self._put_msrs(sections[section])
            else:
                self._views[section][:] = sections[section]
                self._ioctl(self.fd, SET_IOCTL[section], self._buffers[section],
                            device=self.id)

    def _check_msr_indices(self, payload: memoryview) -> None:
        # Loading a subset would silently drop state; a superset cannot be loaded here.
        indices = self._msr_index_reader.unpack_from(payload, _MSRS_HEADER.size)
        if indices != self._msr_indices:
            at = next(i for i, (a, b) in enumerate(zip(indices, self._msr_indices, strict=True))
                      if a != b)
            raise DeviceError(self.id, f"put: record's MSR #{at} is {msr_name(indices[at])}, "
                                       f"this VM migrates {msr_name(self._msr_indices[at])}")

    def _put_msrs(self, payload: memoryview) -> None:
        pos = _MSRS_HEADER.size
        for chunk, entries in self._msr_writes:
            entries[:] = payload[pos:pos + len(entries)]
            done = self._ioctl(self.fd, Ioctl.KVM_SET_MSRS, chunk, device=self.id)
            self._check_msr_batch("KVM_SET_MSRS", chunk, done)
            pos += len(entries)

    def _check_msr_batch(self, op: str, chunk: ctypes.Structure, done: int) -> None:
        # KVM_GET/SET_MSRS return how many entries they processed, stopping at the first
        # MSR that failed: entries[done] is the culprit.
        if done != chunk.nmsrs:
            index = chunk.entries[done].index
            raise DeviceError(self.id, f"{op} stopped at {msr_name(index)} ({index:#x}) "
                                       f"after {done} of {chunk.nmsrs} MSRs")

    def parse(self, record: memoryview) -> dict[int, memoryview]:
        """A record's sections by tag, after checking its header and every section's length."""
        return parse_record(record, self.id, MAGIC, self.vcpu_id, self._expected)

    # -- seeding and verification -----------------------------------------------------

    def seed_state(self, seed: int) -> None:
        """Give this vCPU distinct, non-trivial state that KVM accepts, through :meth:`put`.

        Starts from the vCPU's current state, so every field not seeded keeps KVM's value.
        """
        record = bytearray(self.layout.record_bytes)
        self.get(memoryview(record))
        sections = self.parse(memoryview(record))
        ctx = _SeedContext(self.vcpu_id, np.random.default_rng([seed, self.vcpu_id]),
                           self.layout)
        for section, seeder in _SEEDERS.items():
            seeder(sections[self.layout.resolve(section)], ctx)
        self.put(memoryview(record))

    def compare(self, saved: bytes | memoryview,
                readback: bytes | memoryview) -> list[Difference]:
        """Every field where ``readback`` differs from ``saved``, explained or not.

        A difference within a :data:`TOLERANCES` entry comes back with ``tolerance`` set;
        any other is unexplained. Every byte of every section is compared.
        """
        old, new = self.parse(memoryview(saved)), self.parse(memoryview(readback))
        return [diff for section in self._save
                for diff in _diff_section(section, self.layout, old[section], new[section])]

    # -- lifecycle --------------------------------------------------------------------

    def stable_digest(self, record: bytearray) -> bytes:
        """xxh3_128 of a record of this vCPU with every :data:`TOLERANCES` field zeroed.

        Two vCPUs with equal stable digests agree on every field the kernel does not
        change by itself, so a source and a destination can be compared by digest.
        """
        sections = self.parse(memoryview(record))
        for tolerance in TOLERANCES:
            view = sections.get(self.layout.resolve(tolerance.section))
            if view is None:
                continue
            for field in section_fields(self.layout, self.layout.resolve(tolerance.section)):
                if field.name == tolerance.field:
                    view[field.offset:field.offset + field.size] = bytes(field.size)
        return xxhash.xxh3_128_digest(record)

    def close(self) -> None:
        """Close the vCPU fd. Idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __repr__(self) -> str:
        return f"KvmVcpu({self.id}, fd={self.fd})"


def _msr_batches(chunks: Sequence[Sequence[int]]) -> list[tuple[ctypes.Structure, memoryview]]:
    """For each chunk, a kvm_msrs with its indices filled in and a view of its entries."""
    batches = []
    for indices in chunks:
        batch = uapi.msrs_type(len(indices))()
        batch.nmsrs = len(indices)
        for entry, index in zip(batch.entries, indices, strict=True):
            entry.index = index
        batches.append((batch, _bytes_of(batch)[_MSRS_HEADER.size:]))
    return batches


def _batched(indices: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """``indices`` in order, at most KVM_MAX_MSR_ENTRIES a batch."""
    size = uapi.KVM_MAX_MSR_ENTRIES
    return tuple(tuple(indices[at:at + size]) for at in range(0, len(indices), size))


def msr_chunks(indices: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The KVM_SET_MSRS batches: list order, the deferred MSRs in batches of their own last."""
    regular = [i for i in indices if i not in DEFERRED_MSRS]
    deferred = [i for i in indices if i in DEFERRED_MSRS]
    return _batched(regular) + _batched(deferred)


# ------------------------------------------------------------------------------ seeding

_CR0_PE, _CR0_MP, _CR0_TS, _CR0_ET, _CR0_NE = 0x1, 0x2, 0x8, 0x10, 0x20
_CR0_WP, _CR0_AM, _CR0_PG = 1 << 16, 1 << 18, 1 << 31
_CR4_PAE, _CR4_PGE, _CR4_OSFXSR, _CR4_OSXMMEXCPT = 0x20, 0x80, 0x200, 0x400
# CR4 bits KVM accepts whatever the guest CPUID says (kvm_is_valid_cr4 reserves only bits
# whose feature is absent): VME, PVI, TSD, DE, PSE, MCE, PCE.
_CR4_FREE = (0x1, 0x2, 0x4, 0x8, 0x10, 0x40, 0x100)
_EFER_SCE, _EFER_LME, _EFER_LMA, _EFER_NX = 0x1, 0x100, 0x400, 0x800
_RFLAGS_FIXED = 0x2  # bit 1 always reads 1
_RFLAGS_ARITH = (0x1, 0x4, 0x10, 0x40, 0x80, 0x200, 0x400, 0x800)  # CF PF AF ZF SF IF DF OF
_PAT_TYPES = (0, 1, 4, 5, 6, 7)  # UC WC WT WP WB UC-: every other byte value is reserved
_AVX = 2  # the XCR0 bit of the YMM upper halves
_AVX512 = frozenset({5, 6, 7})  # opmask, ZMM0-15 upper halves, ZMM16-31
_XCR0_SSE, _XCR0_AVX, _XCR0_AVX512 = 0x3, 0x7, 0xE7  # x87|SSE, |AVX, |the AVX-512 three


@dataclass(frozen=True, slots=True)
class _SeedContext:
    """What the seeders share: whose state it is, the random source, the record's shape."""

    vcpu_id: int
    rng: np.random.Generator
    layout: VcpuLayout

    def bits(self, n: int) -> int:
        """A random n-bit integer."""
        return int(self.rng.integers(0, 1 << n, dtype=np.uint64))

    def canonical(self) -> int:
        """A random canonical lower-half address: KVM refuses non-canonical bases/MSRs."""
        return self.bits(47) & ~0xF

    def subset(self, flags: Sequence[int]) -> int:
        """A random OR of some of ``flags``."""
        return sum(f for f in flags if self.rng.integers(2))

    @property
    def xcr0(self) -> int:
        """The vCPU's XCR0, one of those KVM accepts (__kvm_set_xcr): x87 always, AVX
        only with SSE, the three AVX-512 components only together and with AVX."""
        features = {c.feature for c in self.layout.xsave_components}
        choices = [_XCR0_SSE]
        if _AVX in features:
            choices.insert(0, _XCR0_AVX)
            if _AVX512.issubset(features):
                choices.insert(1, _XCR0_AVX512)
        return choices[self.vcpu_id % len(choices)]

    @property
    def tpr_class(self) -> int:
        """CR8, and the LAPIC TPR's upper nibble: one register seen twice (set consistently)."""
        return 1 + self.vcpu_id % 15


def _view(ctype: type[ctypes.Structure], section: memoryview) -> ctypes.Structure:
    # SAFETY: ``section`` is a view of seed_state's record bytearray, which outlives every
    # seeder; the ctypes object lives only for the seeder's call and the bytearray is never
    # resized while exported.
    return ctype.from_buffer(section)


def _seed_mp_state(section: memoryview, ctx: _SeedContext) -> None:
    # The BSP (id 0) runs; the APs are halted, runnable or waiting for a SIPI.
    aps = (MpState.HALTED, MpState.RUNNABLE, MpState.INIT_RECEIVED)
    state = MpState.RUNNABLE if ctx.vcpu_id == 0 else aps[ctx.vcpu_id % len(aps)]
    _view(uapi.kvm_mp_state, section).mp_state = state


def _seed_regs(section: memoryview, ctx: _SeedContext) -> None:
    regs = _view(uapi.kvm_regs, section)
    for name, _ in uapi.kvm_regs._fields_:
        setattr(regs, name, ctx.bits(64))
    regs.rip, regs.rsp = ctx.canonical(), ctx.canonical()
    regs.rflags = _RFLAGS_FIXED | ctx.subset(_RFLAGS_ARITH)  # no TF: it would single-step


def _segment(seg: uapi.kvm_segment, selector: int, seg_type: int, *, base: int = 0,
             limit: int = 0xFFFFFFFF, code: bool = False, system: bool = False) -> None:
    """A present, CPL-0 descriptor cache entry as a 64-bit kernel has it."""
    seg.base, seg.limit, seg.selector, seg.type = base, limit, selector, seg_type
    seg.present, seg.dpl, seg.s, seg.avl, seg.unusable = 1, 0, int(not system), 0, 0
    seg.l = int(code)  # 64-bit code segment
    seg.db = int(not code and not system)  # D/B must be 0 when L is 1
    seg.g = int(not system)


def _seed_sregs(section: memoryview, ctx: _SeedContext) -> None:
    sregs = _view(uapi.kvm_sregs2 if ctx.layout.sregs2 else uapi.kvm_sregs, section)
    _segment(sregs.cs, 0x10, 0xB, code=True)
    for data_seg in (sregs.ds, sregs.es, sregs.ss):
        _segment(data_seg, 0x18, 0x3)
    _segment(sregs.fs, 0x18, 0x3, base=ctx.canonical())  # per-thread and per-CPU bases
    _segment(sregs.gs, 0x18, 0x3, base=ctx.canonical())
    _segment(sregs.tr, 0x40, 0xB, base=ctx.canonical(), limit=0x67, system=True)  # busy TSS
    sregs.ldt.selector, sregs.ldt.type, sregs.ldt.limit = 0, 0x2, 0xFFFF  # no LDT
    sregs.ldt.present, sregs.ldt.unusable = 0, 1
    sregs.gdt.base, sregs.gdt.limit = ctx.canonical() & ~0xFFF, 0x7F
    sregs.idt.base, sregs.idt.limit = ctx.canonical() & ~0xFFF, 0xFFF
    # Long mode with paging: KVM checks CR0/CR4/EFER together (kvm_is_valid_sregs).
    sregs.cr0 = (_CR0_PE | _CR0_ET | _CR0_NE | _CR0_PG
                 | ctx.subset((_CR0_MP, _CR0_TS, _CR0_WP, _CR0_AM)))
    sregs.cr4 = _CR4_PAE | _CR4_PGE | _CR4_OSFXSR | _CR4_OSXMMEXCPT | ctx.subset(_CR4_FREE)
    sregs.efer = _EFER_SCE | _EFER_LME | _EFER_LMA | _EFER_NX
    sregs.cr2 = ctx.canonical()  # the last page-fault address: any value
    sregs.cr3 = (ctx.vcpu_id + 1) << 12  # page-aligned, far below any MAXPHYADDR
    sregs.cr8 = ctx.tpr_class


def _seed_xsave(section: memoryview, ctx: _SeedContext) -> None:
    # Legacy region offsets (Intel SDM vol. 1, 10.5.1); the header at 512; the extended
    # components where CPUID leaf 0xD says. XCOMP_BV stays 0: KVM takes the standard format.
    struct.pack_into("<HHBxHQQI", section, 0,
                     0x037F ^ (ctx.bits(2) << 8),  # FCW: precision control varies
                     ctx.bits(3) << 11,  # FSW: top of stack
                     0xFF,  # abridged FTW: all eight registers valid
                     ctx.bits(11),  # FOP
                     ctx.canonical(), ctx.canonical(),  # FIP, FDP
                     0x1F80 | ctx.bits(2) << 13)  # MXCSR: exceptions masked, rounding varies
    for i in range(8):  # ST0-ST7: 80-bit values in 16-byte slots, the rest reserved (zero)
        section[32 + 16 * i:42 + 16 * i] = ctx.rng.bytes(10)
    section[160:416] = ctx.rng.bytes(256)  # XMM0-XMM15
    for c in ctx.layout.xsave_components:  # YMM upper halves; opmasks and ZMM with AVX-512
        if ctx.xcr0 >> c.feature & 1:
            section[c.offset:c.offset + c.size] = ctx.rng.bytes(c.size)
    struct.pack_into("<Q", section, 512, ctx.xcr0)  # XSTATE_BV: every enabled component


def _seed_xcrs(section: memoryview, ctx: _SeedContext) -> None:
    xcrs = _view(uapi.kvm_xcrs, section)
    xcrs.nr_xcrs, xcrs.flags = 1, 0
    xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, ctx.xcr0


def _seed_debugregs(section: memoryview, ctx: _SeedContext) -> None:
    dbg = _view(uapi.kvm_debugregs, section)
    for i in range(4):
        dbg.db[i] = ctx.canonical()
    dbg.dr6 = 0xFFFF0FF0 | ctx.bits(4)  # fixed-1 bits, and which breakpoint hit
    dbg.dr7 = 0x400 | ctx.bits(8) | ctx.bits(16) << 16  # enables, and each one's RW/LEN


_APIC_ID, _APIC_TPR, _APIC_LDR, _APIC_DFR, _APIC_SVR = 0x20, 0x80, 0xD0, 0xE0, 0xF0
_APIC_LVTT, _APIC_LVTTHMR, _APIC_LVTPC = 0x320, 0x330, 0x340
_APIC_LVT0, _APIC_LVT1, _APIC_LVTERR = 0x350, 0x360, 0x370
_APIC_TMICT, _APIC_TMCCT, _APIC_TDCR = 0x380, 0x390, 0x3E0
_LVT_MASKED, _LVT_EXTINT, _LVT_NMI, _LVT_TSC_DEADLINE = 1 << 16, 0x700, 0x400, 2 << 17
_TDCR_BY_128 = 0xA


def _seed_lapic(section: memoryview, ctx: _SeedContext) -> None:
    vector = 0x30 + ctx.vcpu_id % 0xC0  # valid vectors are 0x10-0xff
    registers = {
        # Not the vCPU id a fresh vCPU starts with, so a round trip proves the ID moved.
        _APIC_ID: ((ctx.vcpu_id + 0x80) & 0xFF) << 24,
        _APIC_TPR: ctx.tpr_class << 4,
        _APIC_LDR: 1 << (24 + ctx.vcpu_id % 8),  # flat logical destination
        _APIC_DFR: 0xFFFFFFFF,  # flat model
        _APIC_SVR: 0x100 | (0xF0 + ctx.vcpu_id % 16),  # software-enabled, spurious vector
        _APIC_LVTTHMR: _LVT_MASKED | vector + 1,
        _APIC_LVTPC: _LVT_MASKED | _LVT_NMI,
        _APIC_LVT0: _LVT_EXTINT if ctx.vcpu_id == 0 else _LVT_MASKED | _LVT_EXTINT,
        _APIC_LVT1: _LVT_NMI,
        _APIC_LVTERR: vector + 2,
        **_seed_timer(ctx, vector),
    }
    for offset, value in registers.items():
        struct.pack_into("<I", section, offset, value)


def _seed_timer(ctx: _SeedContext, vector: int) -> dict[int, int]:
    """Half the vCPUs wait on a TSC deadline (armed by the MSR), half count down one-shot."""
    if ctx.layout.tsc_deadline and ctx.vcpu_id % 2 == 0:
        return {_APIC_LVTT: _LVT_TSC_DEADLINE | vector,
                _APIC_TDCR: (0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB)[ctx.bits(3)]}
    # Started just now (current count = initial count); ~9 minutes at 1 ns / 128 per tick,
    # masked so that an expiry would raise no interrupt.
    count = 0xF0000000 + ctx.vcpu_id
    return {_APIC_LVTT: _LVT_MASKED | vector, _APIC_TDCR: _TDCR_BY_128,
            _APIC_TMICT: count, _APIC_TMCCT: count}


def _seed_msr_values(ctx: _SeedContext, tsc: int) -> dict[int, int]:
    """MSR values KVM accepts from the host, each with the rule that makes it valid.

    IA32_TSC keeps KVM's value: a guest's TSCs run in step, and this host's KVM ignores
    host writes of it (measured: KVM_SET_MSRS reports success and the TSC does not move).
    """
    return {
        0x174: 0x10 + 8 * (ctx.vcpu_id % 16),  # SYSENTER_CS: a GDT selector
        # SYSENTER_ESP/EIP: KVM on AMD keeps 32 bits unless the guest CPUID vendor is Intel.
        0x175: ctx.bits(32), 0x176: ctx.bits(32),
        0xC0000081: 0x0023_0010 << 32 | ctx.bits(32),  # STAR: SYSRET CS, SYSCALL CS, EIP
        0xC0000082: ctx.canonical(), 0xC0000083: ctx.canonical(),  # LSTAR, CSTAR: canonical
        0xC0000084: ctx.bits(22),  # SFMASK: the RFLAGS bits SYSCALL clears; upper half reserved
        0xC0000102: ctx.canonical(),  # KERNEL_GS_BASE: canonical
        0x277: int.from_bytes(bytes(int(ctx.rng.choice(_PAT_TYPES)) for _ in range(8)),
                              "little"),  # PAT: a valid memory type in every byte
        0x3B: ctx.bits(32),  # TSC_ADJUST: a host write sets it without moving the TSC
        # Armed far enough ahead never to fire during a migration (~30 min at 3 GHz), near
        # enough that KVM's (deadline - tsc) * 10^6 ns does not overflow 64 bits.
        MSR_IA32_TSC_DEADLINE: tsc + 5 * 10**12 + ctx.vcpu_id,
        0x1A0: 0x1 | ctx.bits(2) << 11,  # MISC_ENABLE: fast strings, BTS/PEBS unavailable
        0x4B564D05: ctx.bits(1),  # KVM_POLL_CONTROL: bit 0 only
    }


def _seed_msrs(section: memoryview, ctx: _SeedContext) -> None:
    msrs = _view(uapi.msrs_type(len(ctx.layout.msr_indices)), section)
    current = {entry.index: entry.data for entry in msrs.entries}
    values = _seed_msr_values(ctx, current.get(MSR_IA32_TSC, 0))
    for entry in msrs.entries:
        entry.data = values.get(entry.index, entry.data)  # MSRs not seeded keep KVM's value


def _seed_events(section: memoryview, ctx: _SeedContext) -> None:
    # The flags stay as KVM_GET_VCPU_EVENTS reported them: they say NMI and shadow are valid.
    events = _view(uapi.kvm_vcpu_events, section)
    events.nmi.masked = ctx.bits(1)  # inside an NMI handler, or not
    events.interrupt.shadow = uapi.KVM_X86_SHADOW_INT_STI * ctx.bits(1)  # just after STI


_SEEDERS: Mapping[Section, Callable[[memoryview, _SeedContext], None]] = {
    Section.MP_STATE: _seed_mp_state,
    Section.REGS: _seed_regs,
    Section.SREGS: _seed_sregs,
    Section.XSAVE: _seed_xsave,
    Section.XCRS: _seed_xcrs,
    Section.DEBUGREGS: _seed_debugregs,
    Section.LAPIC: _seed_lapic,
    Section.MSRS: _seed_msrs,
    Section.VCPU_EVENTS: _seed_events,
}


# -------------------------------------------------------------------------- comparison


@dataclass(frozen=True, slots=True)
class Field:
    """A named byte range of a section, compared as one little-endian integer."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Tolerance:
    """A field the kernel legitimately changes between a save and a readback."""

    section: Section
    field: str
    max_delta: int  # |readback - saved| allowed
    reason: str


TOLERANCES: tuple[Tolerance, ...] = (
    Tolerance(Section.MSRS, "IA32_TSC", 10**10,
              "the TSC keeps counting between the source's get and the readback; KVM moves "
              "a host write within 1 s of another vCPU's TSC onto that vCPU's "
              "(kvm_synchronize_tsc), and this host's KVM ignores host writes of it "
              "(measured), so the readback is the destination's own TSC, which on one host "
              "is the same clock; 10^10 ticks is 2 s at 5 GHz"),
    Tolerance(Section.LAPIC, "TMCCT", 2 * 10**9,
              "the APIC timer's current count is computed from the remaining time at each "
              "get and counts down; 2*10^9 is 2 s of KVM's 1 GHz APIC bus at divide-by-1"),
)
_TOLERANCE = {(t.section, t.field): t for t in TOLERANCES}


@dataclass(frozen=True, slots=True)
class Difference:
    """One field whose readback differs from what was saved."""

    section: Section
    field: str
    saved: int
    readback: int
    tolerance: Tolerance | None  # set when a listed tolerance covers the difference

    @property
    def explained(self) -> bool:
        """True if the kernel is known to change this field by this much."""
        return self.tolerance is not None

    def __str__(self) -> str:
        why = f" (tolerated: {self.tolerance.reason})" if self.tolerance else ""
        return (f"{self.section.name}.{self.field}: saved {self.saved:#x}, "
                f"read back {self.readback:#x}{why}")


def _diff_section(section: Section, layout: VcpuLayout, old: memoryview,
                  new: memoryview) -> Iterator[Difference]:
    if old == new:
        return
    for field in section_fields(layout, section):
        end = field.offset + field.size
        if old[field.offset:end] != new[field.offset:end]:
            yield _difference(section, field, old[field.offset:end], new[field.offset:end])


def _difference(section: Section, field: Field, old: memoryview, new: memoryview) -> Difference:
    saved, readback = int.from_bytes(old, "little"), int.from_bytes(new, "little")
    tolerance = _TOLERANCE.get((section, field.name))
    if tolerance is not None and abs(readback - saved) > tolerance.max_delta:
        tolerance = None
    return Difference(section, field.name, saved, readback, tolerance)


@functools.cache
def section_fields(layout: VcpuLayout, section: Section) -> tuple[Field, ...]:
    """Every field of ``section``, covering each of its bytes exactly once."""
    if section is Section.XSAVE:
        fields = _xsave_fields(layout)
    elif section is Section.LAPIC:
        fields = _lapic_fields()
    elif section is Section.MSRS:
        fields = _msr_fields(layout.msr_indices)
    else:
        fields = list(_struct_fields(_STRUCTS[section]))
    return _tile(fields, layout.section_bytes(section))


def _struct_fields(ctype: type, prefix: str = "", base: int = 0) -> Iterator[Field]:
    """The scalar leaves of a ctypes struct, named by their C path (``cs.base``)."""
    for name, member_type in ctype._fields_:
        offset = base + getattr(ctype, name).offset
        yield from _member_fields(member_type, prefix + name, offset)


def _member_fields(ctype: type, name: str, offset: int) -> Iterator[Field]:
    if issubclass(ctype, ctypes.Structure):
        yield from _struct_fields(ctype, name + ".", offset)
    elif issubclass(ctype, ctypes.Array):
        step = ctypes.sizeof(ctype._type_)
        for i in range(ctype._length_):
            yield from _member_fields(ctype._type_, f"{name}[{i}]", offset + i * step)
    else:
        yield Field(name, offset, ctypes.sizeof(ctype))


_XSAVE_LEGACY = (Field("FCW", 0, 2), Field("FSW", 2, 2), Field("FTW", 4, 1),
                 Field("FOP", 6, 2), Field("FIP", 8, 8), Field("FDP", 16, 8),
                 Field("MXCSR", 24, 4), Field("MXCSR_MASK", 28, 4),
                 *(Field(f"ST{i}", 32 + 16 * i, 16) for i in range(8)),
                 *(Field(f"XMM{i}", 160 + 16 * i, 16) for i in range(16)),
                 Field("sw_reserved", 464, 48),  # the kernel writes its own bytes here
                 Field("XSTATE_BV", 512, 8), Field("XCOMP_BV", 520, 8))
# (name, bytes per register) of the components with architectural register names.
_XSAVE_REGISTERS = {2: ("YMM{}_H", 16), 5: ("K{}", 8), 6: ("ZMM{}_H", 32), 7: ("ZMM{}", 64)}


def _xsave_fields(layout: VcpuLayout) -> list[Field]:
    fields = list(_XSAVE_LEGACY)
    for c in layout.xsave_components:
        pattern, step = _XSAVE_REGISTERS.get(c.feature, (f"XFEATURE{c.feature}[{{}}]", 64))
        first = 16 if c.feature == 7 else 0  # Hi16_ZMM holds ZMM16-ZMM31
        fields += [Field(pattern.format(first + i), c.offset + at, min(step, c.size - at))
                   for i, at in enumerate(range(0, c.size, step))]
    return fields


_APIC_NAMES = {0x20: "ID", 0x30: "VERSION", 0x80: "TPR", 0x90: "APR", 0xA0: "PPR",
               0xB0: "EOI", 0xC0: "RRD", 0xD0: "LDR", 0xE0: "DFR", 0xF0: "SVR",
               **{0x100 + 0x10 * i: f"ISR{i}" for i in range(8)},
               **{0x180 + 0x10 * i: f"TMR{i}" for i in range(8)},
               **{0x200 + 0x10 * i: f"IRR{i}" for i in range(8)},
               0x280: "ESR", 0x2F0: "LVT_CMCI", 0x300: "ICR", 0x310: "ICR2",
               0x320: "LVT_TIMER", 0x330: "LVT_THERMAL", 0x340: "LVT_PMC",
               0x350: "LVT_LINT0", 0x360: "LVT_LINT1", 0x370: "LVT_ERROR",
               0x380: "TMICT", 0x390: "TMCCT", 0x3E0: "TDCR", 0x3F0: "SELF_IPI"}


def _lapic_fields() -> list[Field]:
    # 32-bit registers at a 16-byte stride; the other 12 bytes of each slot are compared too
    # (KVM keeps the x2APIC ICR's upper half in ICR's slot).
    fields = []
    for offset in range(0, uapi.KVM_APIC_REG_SIZE, 16):
        name = _APIC_NAMES.get(offset, f"APIC_{offset:#05x}")
        fields += [Field(name, offset, 4), Field(f"{name}.upper", offset + 4, 12)]
    return fields


def _msr_fields(indices: Sequence[int]) -> list[Field]:
    fields = [Field("nmsrs", 0, 4), Field("pad", 4, 4)]
    for i, index in enumerate(indices):
        at = _MSRS_HEADER.size + 16 * i
        name = msr_name(index)
        fields += [Field(f"{name}.index", at, 4), Field(f"{name}.reserved", at + 4, 4),
                   Field(name, at + 8, 8)]
    return fields


def _tile(fields: Sequence[Field], size: int) -> tuple[Field, ...]:
    """``fields`` in offset order, with every gap between them named, so no byte is skipped."""
    tiled: list[Field] = []
    pos = 0
    for field in sorted(fields, key=lambda f: f.offset):
        if field.offset < pos:
            raise ValueError(f"field {field.name} overlaps the one before it")
        if field.offset > pos:
            tiled.append(Field(f"bytes[{pos:#x}:{field.offset:#x}]", pos, field.offset - pos))
        tiled.append(field)
        pos = field.offset + field.size
    if pos > size:
        raise ValueError(f"fields end at {pos}, beyond the section's {size} B")
    if pos < size:
        tiled.append(Field(f"bytes[{pos:#x}:{size:#x}]", pos, size - pos))
    return tuple(tiled)
