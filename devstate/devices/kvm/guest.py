"""The live guest from the host's side: where the guest program's parts live in guest RAM,
and how the host installs the program and enters vCPUs into it. What the host reads back
to judge whether the guest went on running is :mod:`.guest_view`.

Runs in: :func:`install` in any process that maps the RAM (the coordinator, before the
first vCPU runs); :func:`enter` in the VM's owner (vCPU ioctls: the owner rule), before the
vCPU's first KVM_RUN.

The program (:mod:`.guest_program`, source ``guest.S``) is the same on every vCPU, and
nothing in it initialises anything shared: the host writes the shared parts (params,
page tables, GDT, IDT, code) and each vCPU's own (its control block's identity and its
TSS) before any vCPU runs, and puts every vCPU, APs too, straight into long mode at the
program's entry, RUNNABLE: no INIT/SIPI, so no vCPU waits for another.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from devstate.config.spec import DEFAULT_TICK_MS, MIN_TICK_MS
from devstate.devices.kvm import guest_program as gp
from devstate.devices.kvm import structs, uapi
from devstate.devices.kvm.uapi import Ioctl
from devstate.devices.kvm.vm import RAM_HOLE_START
from devstate.errors import DeviceError, SpecError

if TYPE_CHECKING:  # an annotation only; importing it here puts mypy in an import cycle
    from devstate.devices.kvm.vcpu import KvmVcpu

# A tick of 50 ms and 256 loops a tick (~5 us of native code): 5120 loops/s per vCPU.
# The tick's yield and timer interrupt run in kvm-pvm's emulator and cost ~100 us of host
# CPU each (measured), so 288 vCPUs take ~0.5 of a host CPU at 20 ticks/s, and twice that
# at 40: the tick is what lets hundreds of vCPUs share 2 host CPUs with a migration. A
# spec sets it (``[ram] tick_ms``, where its bounds are explained).
DEFAULT_TICK_NS = round(DEFAULT_TICK_MS * 1e6)
DEFAULT_LOOPS_PER_TICK = 256
MIN_TICK_NS = round(MIN_TICK_MS * 1e6)

AREA_BYTES = gp.PAGE_BYTES  # a vCPU's page: control block, TSS, checksum block, stacks
_PARAMS = struct.Struct("<7I")  # magic, version, vcpus, tick_ns, loops, dirty, ws pages
# Flat descriptors, present, accessed (an IRET reloading CS or SS would otherwise set the
# accessed bit: a write into the GDT): 64-bit code (L) or 4 GiB read/write data, DPL 0 or 3.
_KERNEL_CODE = 0x00AF_9B00_0000_FFFF
_KERNEL_DATA = 0x00CF_9300_0000_FFFF
_USER_DATA = 0x00CF_F300_0000_FFFF
_USER_CODE = 0x00AF_FB00_0000_FFFF
_BUSY_TSS = 0x8B  # present, DPL 0, busy 64-bit TSS: as LTR leaves it
_INTERRUPT_GATE = 0x8E  # present, DPL 0, 64-bit interrupt gate: IF cleared on entry
_CODE_TYPE, _DATA_TYPE = 0xB, 0x3  # execute/read, read/write; both accessed
_TSS_TYPE = 0xB  # busy 64-bit TSS
_PAGE_TABLE_LINK = 0x7  # present, writable, user
_LARGE_PAGE = 0x87  # present, writable, user, 2 MiB
_CR0 = 0x8001_0033  # PG | WP | NE | ET | MP | PE; EM and TS clear for SSE and AVX
_CR4 = 1 << 5 | 1 << 9 | 1 << 10 | 1 << 18  # PAE | OSFXSR | OSXMMEXCPT | OSXSAVE
_EFER = 1 << 8 | 1 << 10  # LME | LMA
_XCR0 = 0b111  # x87 | SSE | AVX: the program keeps patterns in YMM0 and YMM15
_XCR0_AVX = 2
_RFLAGS = 0x2  # the reserved bit; IF clear until the program has set up its LAPIC

# One vCPU's page as numpy sees it (the TSS and the stacks are not fields).
_AREA = np.dtype({
    "names": ["counter", "fail_code", "fail_where", "fail_value", "seq", "sum", "ticks",
              "index", "stack_top", "block", "working_set", "words"],
    "formats": ["<u8", "<u4", "<u4", "<u8", "<u4", "<u4", "<u4", "<u8", "<u8", "<u8", "<u8",
                ("<u4", (gp.CHECKSUM_WORDS,))],
    "offsets": [gp.CB_COUNTER, gp.CB_FAIL_CODE, gp.CB_FAIL_WHERE, gp.CB_FAIL_VALUE, gp.CB_SEQ,
                gp.CB_SUM, gp.CB_TICKS, gp.CB_INDEX, gp.CB_STACK_TOP, gp.CB_BLOCK,
                gp.CB_WS_BASE, gp.CHECKSUM_BLOCK],
    "itemsize": AREA_BYTES,
})


@dataclass(frozen=True, slots=True)
class GuestLayout:
    """Where a guest of ``vcpus`` vCPUs in ``ram_bytes`` of RAM keeps its parts (the map is
    in :mod:`.guest_program`); ``working_set_pages`` is the most pages each vCPU's working
    set may have: its share of the RAM left below 3 GiB."""

    vcpus: int
    ram_bytes: int
    working_set_pages: int

    @classmethod
    def of(cls, vcpus: int, ram_bytes: int) -> GuestLayout:
        """The layout, or SpecError if the RAM cannot hold the program for ``vcpus``."""
        if vcpus < 1:
            raise SpecError("vcpus.count", f"the guest needs at least one vCPU, not {vcpus}")
        if ram_bytes % gp.PAGE_BYTES:
            raise SpecError("ram.size", f"{ram_bytes} B is not a multiple of the "
                                        f"{gp.PAGE_BYTES} B page")
        need = cls.min_ram_bytes(vcpus)
        # The page tables map the low 4 GiB; RAM beyond 3 GiB is above the hole, unmapped.
        reachable = min(ram_bytes, RAM_HOLE_START)
        if reachable < need:
            raise SpecError("ram.size", f"{ram_bytes} B cannot hold the guest program for "
                                        f"{vcpus} vCPUs: it needs at least {need} B "
                                        f"({need / 2**20:.2f} MiB)")
        return cls(vcpus, ram_bytes, (reachable - need) // gp.PAGE_BYTES // vcpus)

    @staticmethod
    def min_ram_bytes(vcpus: int) -> int:
        """The least RAM the program needs for ``vcpus`` vCPUs (no working sets)."""
        return _areas_start(vcpus) + vcpus * AREA_BYTES

    @property
    def gdt_limit(self) -> int:
        """The GDT's limit: its fixed descriptors and one TSS descriptor per vCPU."""
        return 8 * gp.GDT_FIXED_ENTRIES + 16 * self.vcpus - 1

    def area(self, index: int) -> int:
        """Address of vCPU ``index``'s page, its control block's (and FS base) too."""
        return _areas_start(self.vcpus) + index * AREA_BYTES

    @property
    def working_sets(self) -> int:
        """Address of the first working set (vCPU 0's): the page after the last area."""
        return self.min_ram_bytes(self.vcpus)

    def working_set(self, index: int) -> int:
        """Address of vCPU ``index``'s working set."""
        return self.working_sets + index * self.working_set_pages * gp.PAGE_BYTES


def _areas_start(vcpus: int) -> int:
    """The vCPUs' pages start at the page after the GDT."""
    gdt_end = gp.GDT + 8 * gp.GDT_FIXED_ENTRIES + 16 * vcpus
    return -(-gdt_end // gp.PAGE_BYTES) * gp.PAGE_BYTES


@dataclass(frozen=True, slots=True)
class GuestParams:
    """What every vCPU does per tick of its LAPIC timer: ``loops_per_tick`` loops (checks
    and a checksum update each), then it dirties ``dirty_pages_per_tick`` pages of its
    working set (the first ``working_set_pages`` pages of its share, in turn), then it
    halts until the next tick. Written into RAM before any vCPU runs."""

    tick_ns: int = DEFAULT_TICK_NS  # LAPIC timer period (KVM's APIC bus counts ns)
    loops_per_tick: int = DEFAULT_LOOPS_PER_TICK
    dirty_pages_per_tick: int = 0
    working_set_pages: int = 0

    def check(self, layout: GuestLayout) -> None:
        """SpecError naming the first parameter ``layout`` cannot run."""
        if not MIN_TICK_NS <= self.tick_ns < 1 << 32:
            raise SpecError("guest.tick_ns", f"{self.tick_ns} is outside {MIN_TICK_NS} ns "
                                             "(KVM's shortest periodic timer) .. 2**32 - 1")
        if not 1 <= self.loops_per_tick < 1 << 32:
            raise SpecError("guest.loops_per_tick", f"{self.loops_per_tick} is outside "
                                                    "1 .. 2**32 - 1")
        if not 0 <= self.working_set_pages <= layout.working_set_pages:
            raise SpecError("guest.working_set_pages", f"{self.working_set_pages} pages: this "
                            f"RAM has room for 0 .. {layout.working_set_pages} per vCPU")
        if not 0 <= self.dirty_pages_per_tick < 1 << 32:
            raise SpecError("guest.dirty_pages_per_tick", f"{self.dirty_pages_per_tick} is "
                                                          "outside 0 .. 2**32 - 1")
        if self.dirty_pages_per_tick and not self.working_set_pages:
            raise SpecError("guest.dirty_pages_per_tick", "dirtying pages needs a working set "
                                                          "(working_set_pages > 0)")


DEFAULT_PARAMS = GuestParams()


def install(ram: memoryview, layout: GuestLayout, params: GuestParams = DEFAULT_PARAMS) -> None:
    """Write the program, its tables, ``params``, and zeroed control blocks with each
    vCPU's identity into ``ram``.

    Runs before any vCPU does (the writer is the RAM's only user then). Working sets are
    left as they are: a new memfd reads as zeros.
    """
    params.check(layout)
    if len(ram) < layout.ram_bytes:
        raise DeviceError("guest", f"install: RAM of {len(ram)} B, the layout is for "
                                   f"{layout.ram_bytes} B")
    ram[:layout.working_sets] = bytes(layout.working_sets)
    ram[gp.CODE:gp.CODE + len(gp.PROGRAM)] = gp.PROGRAM
    _write_page_tables(ram)
    _write_idt(ram)
    indices = np.arange(layout.vcpus, dtype=np.uint64)
    vcpu_pages = areas(ram, layout)
    vcpu_pages["index"] = indices
    at = layout.area(0) + indices * AREA_BYTES
    vcpu_pages["stack_top"] = at + gp.USER_STACK_TOP
    vcpu_pages["block"] = at + gp.CHECKSUM_BLOCK
    vcpu_pages["working_set"] = layout.working_set(0) + indices * (layout.working_set_pages
                                                              * gp.PAGE_BYTES)
    _write_gdt_and_tsss(ram, layout)
    _PARAMS.pack_into(ram, gp.PARAMS_MAGIC, 0, gp.VERSION, layout.vcpus, params.tick_ns,
                      params.loops_per_tick, params.dirty_pages_per_tick,
                      params.working_set_pages)
    struct.pack_into("<I", ram, gp.PARAMS_MAGIC, gp.MAGIC)  # last: everything is in place


def _write_page_tables(ram: memoryview) -> None:
    """An identity map of the low 4 GiB in 2 MiB pages, all of it user-accessible: the
    program's user part touches its control block, checksum block and working set."""
    struct.pack_into("<Q", ram, gp.PML4, gp.PDPT | _PAGE_TABLE_LINK)
    for gib in range(gp.IDENTITY_MAP_GIB):
        directory = gp.PAGE_DIRECTORIES + gib * gp.PAGE_BYTES
        struct.pack_into("<Q", ram, gp.PDPT + 8 * gib, directory | _PAGE_TABLE_LINK)
        pages = np.arange(512, dtype=np.uint64) + 512 * gib
        ram[directory:directory + gp.PAGE_BYTES] = (pages << 21 | _LARGE_PAGE).tobytes()


def _write_idt(ram: memoryview) -> None:
    """Exceptions to their stubs (#UD to its own handler, the yield's), the timer and the
    spurious vector to theirs; every other gate not present."""
    gates = np.zeros((gp.IDT_GATES, 2), np.uint64)
    for vector in range(gp.EXCEPTION_VECTORS):
        gates[vector] = _gate(gp.LABELS["exceptions"] + 4 * vector)
    gates[gp.INVALID_OPCODE_VECTOR] = _gate(gp.LABELS["invalid_opcode"])
    gates[gp.TIMER_VECTOR] = _gate(gp.LABELS["timer_interrupt"])
    gates[gp.SPURIOUS_VECTOR] = _gate(gp.LABELS["spurious_interrupt"])
    ram[gp.IDT:gp.IDT + gates.nbytes] = gates.tobytes()


def _gate(offset: int) -> tuple[int, int]:
    """A 64-bit interrupt gate (two quadwords) to the program's byte ``offset``."""
    address = gp.CODE + offset
    return (address & 0xFFFF | gp.KERNEL_CODE_SELECTOR << 16 | _INTERRUPT_GATE << 40
            | (address >> 16 & 0xFFFF) << 48, address >> 32)


def _write_gdt_and_tsss(ram: memoryview, layout: GuestLayout) -> None:
    """The GDT with a busy TSS descriptor per vCPU, and each TSS: its RSP0 is the vCPU's
    kernel stack, where exceptions and interrupts from user mode push their frames."""
    struct.pack_into("<5Q", ram, gp.GDT, 0, _KERNEL_CODE, _KERNEL_DATA, _USER_DATA, _USER_CODE)
    for index in range(layout.vcpus):
        tss = layout.area(index) + gp.TSS
        low = ((gp.TSS_BYTES - 1) | (tss & 0xFF_FFFF) << 16 | _BUSY_TSS << 40
               | (tss >> 24 & 0xFF) << 56)
        struct.pack_into("<2Q", ram, gp.GDT + gp.FIRST_TSS_SELECTOR + 16 * index,
                         low, tss >> 32)
        # RSP0 at 4; the I/O map base at 102 points past the limit: no I/O bitmap.
        struct.pack_into("<Q", ram, tss + 4, layout.area(index) + gp.KERNEL_STACK_TOP)
        struct.pack_into("<H", ram, tss + 102, gp.TSS_BYTES)


def enter(vcpu: KvmVcpu, index: int, layout: GuestLayout) -> None:
    """Make ``vcpu`` start the program as vCPU ``index`` at its next KVM_RUN.

    In the restore order's order (MP state, REGS, SREGS, then XCRS, whose AVX bit the
    OSXSAVE of SREGS lets the guest use): RUNNABLE, at the kernel entry with RSI = index and
    RSP at its kernel stack top, in long mode with FS based at its control block and TR at
    its TSS, SSE and AVX enabled. The LAPIC stays as KVM made it: the program programs
    its timer.
    """
    if not 0 <= index < layout.vcpus:
        raise DeviceError(vcpu.id, f"enter: index {index} is outside the layout's "
                                   f"{layout.vcpus} vCPUs")
    if not any(c.feature == _XCR0_AVX for c in vcpu.layout.xsave_components):
        raise DeviceError(vcpu.id, "enter: the guest program keeps state in YMM registers, "
                                   "and this host's KVM offers no AVX (XSAVE component 2)")
    area = layout.area(index)
    _call(vcpu, Ioctl.KVM_SET_MP_STATE, structs.kvm_mp_state(mp_state=structs.MpState.RUNNABLE))
    _call(vcpu, Ioctl.KVM_SET_REGS, structs.kvm_regs(
        rip=gp.CODE + gp.LABELS["kernel_entry"], rsp=area + gp.KERNEL_STACK_TOP, rsi=index,
        rflags=_RFLAGS))
    sregs = structs.kvm_sregs()
    _call(vcpu, Ioctl.KVM_GET_SREGS, sregs)  # keeps KVM's LDT and APIC base
    _segment(sregs.cs, gp.KERNEL_CODE_SELECTOR, _CODE_TYPE, long=True)
    _segment(sregs.ss, gp.KERNEL_DATA_SELECTOR, _DATA_TYPE)
    # DPL 3, so that an IRET to user mode keeps them (it nulls data segments of DPL < 3).
    for name in ("ds", "es", "gs"):
        _segment(getattr(sregs, name), gp.USER_DATA_SELECTOR, _DATA_TYPE, dpl=3)
    _segment(sregs.fs, gp.USER_DATA_SELECTOR, _DATA_TYPE, dpl=3, base=area)
    _tss_segment(sregs.tr, gp.FIRST_TSS_SELECTOR + 16 * index, area + gp.TSS)
    sregs.gdt.base, sregs.gdt.limit = gp.GDT, layout.gdt_limit
    sregs.idt.base, sregs.idt.limit = gp.IDT, 16 * gp.IDT_GATES - 1
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = _CR0, gp.PML4, _CR4, _EFER
    _call(vcpu, Ioctl.KVM_SET_SREGS, sregs)
    xcrs = structs.kvm_xcrs(nr_xcrs=1)
    xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, _XCR0
    _call(vcpu, Ioctl.KVM_SET_XCRS, xcrs)


def _call(vcpu: KvmVcpu, request: Ioctl, arg: uapi.IoctlArg) -> None:
    uapi.ioctl(vcpu.fd, request, arg, device=vcpu.id)


def _segment(segment: structs.kvm_segment, selector: int, kind: int, *, dpl: int = 0,
             base: int = 0, long: bool = False) -> None:
    """A present flat code or data segment (the limit is in bytes here); ``long``: 64-bit
    code."""
    segment.base, segment.limit, segment.selector, segment.type = base, 0xFFFF_FFFF, selector, kind
    segment.present, segment.dpl, segment.s, segment.g = 1, dpl, 1, 1
    segment.l, segment.db = int(long), int(not long)
    segment.avl = segment.unusable = 0


def _tss_segment(segment: structs.kvm_segment, selector: int, base: int) -> None:
    """TR as LTR leaves it: a busy 64-bit TSS, a system segment."""
    segment.base, segment.limit, segment.selector, segment.type = (base, gp.TSS_BYTES - 1,
                                                                   selector, _TSS_TYPE)
    segment.present, segment.dpl, segment.s, segment.g = 1, 0, 0, 0
    segment.l = segment.db = segment.avl = segment.unusable = 0


def areas(ram: memoryview, layout: GuestLayout) -> npt.NDArray[np.void]:
    """Every vCPU's page as a record of :data:`_AREA`, in place."""
    # SAFETY: the array holds an export of ``ram``, and GuestRam.close leaves a mapping
    # with exports mapped until the last goes, so the array never reads unmapped memory.
    return np.frombuffer(ram, _AREA, count=layout.vcpus, offset=layout.area(0))
