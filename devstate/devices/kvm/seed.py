"""Seeding a ``kvm`` vCPU with distinct, non-trivial state that KVM accepts (tests, demos).

Each seeder writes one section of a record got from the vCPU, so every field not seeded
keeps KVM's value; the vCPU then takes the record through its ordinary put.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from devstate.devices.kvm import structs
from devstate.devices.kvm.record import (
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    Section,
    VcpuLayout,
)
from devstate.devices.kvm.structs import MpState

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
    _view(structs.kvm_mp_state, section).mp_state = state


def _seed_regs(section: memoryview, ctx: _SeedContext) -> None:
    regs = _view(structs.kvm_regs, section)
    for name, *_ in structs.kvm_regs._fields_:
        setattr(regs, name, ctx.bits(64))
    regs.rip, regs.rsp = ctx.canonical(), ctx.canonical()
    regs.rflags = _RFLAGS_FIXED | ctx.subset(_RFLAGS_ARITH)  # no TF: it would single-step


def _segment(seg: structs.kvm_segment, selector: int, seg_type: int, *, base: int = 0,
             limit: int = 0xFFFFFFFF, code: bool = False, system: bool = False) -> None:
    """A present, CPL-0 descriptor cache entry as a 64-bit kernel has it."""
    seg.base, seg.limit, seg.selector, seg.type = base, limit, selector, seg_type
    seg.present, seg.dpl, seg.s, seg.avl, seg.unusable = 1, 0, int(not system), 0, 0
    seg.l = int(code)  # 64-bit code segment
    seg.db = int(not code and not system)  # D/B must be 0 when L is 1
    seg.g = int(not system)


def _seed_sregs(section: memoryview, ctx: _SeedContext) -> None:
    sregs = _view(structs.kvm_sregs2 if ctx.layout.sregs2 else structs.kvm_sregs, section)
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
    xcrs = _view(structs.kvm_xcrs, section)
    xcrs.nr_xcrs, xcrs.flags = 1, 0
    xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, ctx.xcr0


def _seed_debugregs(section: memoryview, ctx: _SeedContext) -> None:
    dbg = _view(structs.kvm_debugregs, section)
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
    msrs = _view(structs.msrs_type(len(ctx.layout.msr_indices)), section)
    current = {entry.index: entry.data for entry in msrs.entries}
    values = _seed_msr_values(ctx, current.get(MSR_IA32_TSC, 0))
    for entry in msrs.entries:
        entry.data = values.get(entry.index, entry.data)  # MSRs not seeded keep KVM's value


def _seed_events(section: memoryview, ctx: _SeedContext) -> None:
    # The flags stay as KVM_GET_VCPU_EVENTS reported them: they say NMI and shadow are valid.
    events = _view(structs.kvm_vcpu_events, section)
    events.nmi.masked = ctx.bits(1)  # inside an NMI handler, or not
    events.interrupt.shadow = structs.KVM_X86_SHADOW_INT_STI * ctx.bits(1)  # just after STI


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




def seed_sections(sections: Mapping[int, memoryview], vcpu_id: int, seed: int,
                  layout: VcpuLayout) -> None:
    """Seed every seeded section of one vCPU's parsed record in place (``sections`` keyed
    by the layout's own sections, SREGS2 standing for SREGS where the host has it)."""
    ctx = _SeedContext(vcpu_id, np.random.default_rng([seed, vcpu_id]), layout)
    for section, seeder in _SEEDERS.items():
        seeder(sections[layout.resolve(section)], ctx)
