"""The KVM x86 structs a VMM needs to migrate vCPUs and VM-level state, in ctypes.

Transcribed from ``/usr/include/linux/kvm.h`` and ``/usr/include/x86_64-linux-gnu/asm/kvm.h``;
``tests/test_kvm_uapi.py`` compiles a C program against those headers and asserts every
size here. All fields are naturally aligned, so plain :class:`ctypes.Structure` reproduces
the C layout. The ioctl numbers and the one call are :mod:`.uapi`'s.
"""

from __future__ import annotations

import ctypes
import enum
import functools
from ctypes import c_int64, c_uint8, c_uint16, c_uint32, c_uint64, sizeof
from typing import TYPE_CHECKING, Any

KVM_NR_INTERRUPTS = 256
KVM_APIC_REG_SIZE = 0x400
KVM_MAX_XCRS = 16
KVM_IOAPIC_NUM_PINS = 24
# Largest MSR batch kvm-bindings sends per KVM_GET_MSRS/KVM_SET_MSRS (KVM_MAX_MSR_ENTRIES).
KVM_MAX_MSR_ENTRIES = 256


# --------------------------------------------------------------------------- vCPU structs


class kvm_regs(ctypes.Structure):
    """``KVM_GET_REGS``/``KVM_SET_REGS``: general-purpose registers, RIP and RFLAGS."""

    _fields_ = [(name, c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    """A segment register's hidden descriptor cache."""

    _fields_ = [("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16),
                ("type", c_uint8), ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8),
                ("s", c_uint8), ("l", c_uint8), ("g", c_uint8), ("avl", c_uint8),
                ("unusable", c_uint8), ("padding", c_uint8)]


class kvm_dtable(ctypes.Structure):
    """GDTR or IDTR."""

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


if TYPE_CHECKING:  # ctypes' generic classes are not subscriptable at run time in 3.11
    # A struct's member list, as ctypes' _fields_ takes it.
    Members = list[tuple[str, type[ctypes.Structure] | type[ctypes._SimpleCData[Any]]
                         | type[ctypes.Array[Any]]]]
_SEGMENTS: Members = [(name, kvm_segment)
                      for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
_SYSTEM: Members = [("gdt", kvm_dtable), ("idt", kvm_dtable)] + [
    (name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]


class kvm_sregs(ctypes.Structure):
    """``KVM_GET_SREGS``: segments, descriptor tables, control registers, EFER, APIC base."""

    _fields_ = _SEGMENTS + _SYSTEM + [
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_sregs2(ctypes.Structure):
    """``KVM_GET_SREGS2``: as sregs, plus the PAE PDPTRs; pending interrupts moved to events."""

    _fields_ = _SEGMENTS + _SYSTEM + [("flags", c_uint64), ("pdptrs", c_uint64 * 4)]


KVM_SREGS2_FLAGS_PDPTRS_VALID = 1


class kvm_msr_entry(ctypes.Structure):
    """One MSR: index and value."""

    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    """``KVM_GET_MSRS`` header; the entries follow (see :func:`msrs_type`)."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(ctypes.Structure):
    """``KVM_GET_MSR_INDEX_LIST`` header; the indices follow (see :func:`msr_list_type`)."""

    _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * 0)]


class kvm_lapic_state(ctypes.Structure):
    """The local APIC register page: 32-bit registers at a 16-byte stride."""

    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]


class _Exception(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8),
                ("pending", c_uint8), ("error_code", c_uint32)]


class _Interrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _Nmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8),
                ("pad", c_uint8)]


class _Smi(ctypes.Structure):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8),
                ("latched_init", c_uint8)]


class _TripleFault(ctypes.Structure):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(ctypes.Structure):
    """Pending and injected exceptions, interrupts, NMIs and SMIs, and the interrupt shadow."""

    _fields_ = [("exception", _Exception), ("interrupt", _Interrupt), ("nmi", _Nmi),
                ("sipi_vector", c_uint32), ("flags", c_uint32), ("smi", _Smi),
                ("triple_fault", _TripleFault), ("reserved", c_uint8 * 26),
                ("exception_has_payload", c_uint8), ("exception_payload", c_uint64)]


class VcpuEventsValid(enum.IntFlag):
    """``KVM_VCPUEVENT_VALID_*``: which optional parts of kvm_vcpu_events a set applies."""

    NMI_PENDING = 0x01
    SIPI_VECTOR = 0x02
    SHADOW = 0x04
    SMM = 0x08
    PAYLOAD = 0x10
    TRIPLE_FAULT = 0x20


KVM_X86_SHADOW_INT_MOV_SS = 0x01
KVM_X86_SHADOW_INT_STI = 0x02


class kvm_mp_state(ctypes.Structure):
    """The vCPU's multiprocessing state (:class:`MpState`)."""

    _fields_ = [("mp_state", c_uint32)]


class MpState(enum.IntEnum):
    """``KVM_MP_STATE_*``."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


class kvm_debugregs(ctypes.Structure):
    """DR0-DR3, DR6, DR7."""

    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64),
                ("flags", c_uint64), ("reserved", c_uint64 * 9)]


class kvm_xsave(ctypes.Structure):
    """The XSAVE area in standard (uncompacted) format; larger ones: :func:`xsave_type`."""

    _fields_ = [("region", c_uint32 * 1024), ("extra", c_uint32 * 0)]


class kvm_xcr(ctypes.Structure):
    """One extended control register."""

    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(ctypes.Structure):
    """Extended control registers (XCR0)."""

    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", c_uint64 * 16)]


class kvm_cpuid_entry2(ctypes.Structure):
    """One CPUID leaf (function, index) and its four registers."""

    _fields_ = [("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
                ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32),
                ("padding", c_uint32 * 3)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # sic, the kernel's spelling


class kvm_cpuid2(ctypes.Structure):
    """``KVM_SET_CPUID2`` header; the entries follow (see :func:`cpuid2_type`)."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * 0)]


# ----------------------------------------------------------------------------- VM structs


class kvm_pic_state(ctypes.Structure):
    """One 8259 PIC."""

    _fields_ = [(name, c_uint8) for name in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
        "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
        "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


class kvm_ioapic_state(ctypes.Structure):
    """The IOAPIC; each redirection entry as its 64 raw bits (the header's ``bits``)."""

    _fields_ = [("base_address", c_uint64), ("ioregsel", c_uint32), ("id", c_uint32),
                ("irr", c_uint32), ("pad", c_uint32),
                ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS)]


class _IrqchipState(ctypes.Union):
    _fields_ = [("dummy", c_uint8 * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):
    """``KVM_GET_IRQCHIP``: one chip of the in-kernel irqchip, chosen by ``chip_id``."""

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _IrqchipState)]


class IrqchipId(enum.IntEnum):
    """``KVM_IRQCHIP_*``."""

    PIC_MASTER = 0
    PIC_SLAVE = 1
    IOAPIC = 2


class kvm_pit_config(ctypes.Structure):
    """``KVM_CREATE_PIT2`` argument."""

    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_pit_channel_state(ctypes.Structure):
    """One 8254 channel."""

    _fields_ = [("count", c_uint32), ("latched_count", c_uint16)] + [
        (name, c_uint8) for name in ("count_latched", "status_latched", "status", "read_state",
                                     "write_state", "write_latch", "rw_mode", "mode", "bcd",
                                     "gate")] + [("count_load_time", c_int64)]


class kvm_pit_state2(ctypes.Structure):
    """The in-kernel 8254 PIT."""

    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", c_uint32),
                ("reserved", c_uint32 * 9)]


class kvm_clock_data(ctypes.Structure):
    """The VM's kvmclock; ``realtime``/``host_tsc`` are valid when ``flags`` says so."""

    _fields_ = [("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32),
                ("realtime", c_uint64), ("host_tsc", c_uint64), ("pad", c_uint32 * 4)]


class ClockFlags(enum.IntFlag):
    """``KVM_CLOCK_*`` flags of kvm_clock_data."""

    TSC_STABLE = 2
    REALTIME = 1 << 2
    HOST_TSC = 1 << 3


# ------------------------------------------------------- variable-length (flexible array)


class kvm_userspace_memory_region(ctypes.Structure):
    """A guest-physical range backed by this process's memory (``KVM_SET_USER_MEMORY_REGION``)."""

    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64)]


class MemFlag(enum.IntFlag):
    """``kvm_userspace_memory_region.flags``."""

    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1


class kvm_dirty_log(ctypes.Structure):
    """A memslot's dirty bitmap, one bit per page, fetched and cleared (``KVM_GET_DIRTY_LOG``)."""

    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


@functools.cache
def msrs_type(n: int) -> type[ctypes.Structure]:
    """``struct kvm_msrs`` with room for ``n`` entries."""
    return type(f"kvm_msrs_{n}", (ctypes.Structure,), {"_fields_": [
        ("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * n)]})


@functools.cache
def msr_list_type(n: int) -> type[ctypes.Structure]:
    """``struct kvm_msr_list`` with room for ``n`` indices."""
    return type(f"kvm_msr_list_{n}", (ctypes.Structure,), {"_fields_": [
        ("nmsrs", c_uint32), ("indices", c_uint32 * n)]})


@functools.cache
def cpuid2_type(n: int) -> type[ctypes.Structure]:
    """``struct kvm_cpuid2`` with room for ``n`` entries."""
    return type(f"kvm_cpuid2_{n}", (ctypes.Structure,), {"_fields_": [
        ("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * n)]})


@functools.cache
def xsave_type(size: int) -> type[ctypes.Structure]:
    """``struct kvm_xsave`` of ``size`` bytes (``KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)``)."""
    if size < sizeof(kvm_xsave) or size % 4:
        raise ValueError(f"XSAVE size {size} is not a multiple of 4 of at least 4096")
    return type(f"kvm_xsave_{size}", (ctypes.Structure,), {"_fields_": [
        ("region", c_uint32 * 1024), ("extra", c_uint32 * ((size - sizeof(kvm_xsave)) // 4))]})
