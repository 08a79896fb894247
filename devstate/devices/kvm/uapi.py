"""The KVM x86 ABI a VMM needs to migrate vCPUs and VM-level state, in ctypes.

Runs in: any process; the calls work only in the process that created the VM (the owner
rule, ARCHITECTURE.md section 3). Transcribed from ``/usr/include/linux/kvm.h`` and
``/usr/include/x86_64-linux-gnu/asm/kvm.h``; ``tests/test_kvm_uapi.py`` compiles a C
program against those headers and asserts every size and number here. All fields are
naturally aligned, so plain :class:`ctypes.Structure` reproduces the C layout.

Every ioctl goes through :func:`ioctl`: libc's ``ioctl`` called through ctypes, which
releases the GIL for the call and passes buffers in place. ``fcntl.ioctl`` would copy
buffers of up to 1 KiB, hold the GIL for larger ones and refuse immutable ones over 1 KiB
(shared/reference/kvm-vcpu-state.md, "fcntl.ioctl quirks").
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_codes
import functools
import os
from ctypes import c_int64, c_uint8, c_uint16, c_uint32, c_uint64, sizeof
from typing import TYPE_CHECKING, Any, Protocol

from devstate.errors import DeviceError

KVM_API_VERSION = 12  # the only version since Linux 2.6.22; anything else is another ABI
KVMIO = 0xAE
KVM_NR_INTERRUPTS = 256
KVM_APIC_REG_SIZE = 0x400
KVM_MAX_XCRS = 16
KVM_IOAPIC_NUM_PINS = 24
# Largest MSR batch kvm-bindings sends per KVM_GET_MSRS/KVM_SET_MSRS (KVM_MAX_MSR_ENTRIES).
KVM_MAX_MSR_ENTRIES = 256

# ------------------------------------------------------------------ ioctl number encoding
# include/uapi/asm-generic/ioctl.h: dir:2 | size:14 | type:8 | nr:8, from the top bit down.
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_SIZEBITS = 14
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

CType = type[ctypes.Structure]


def _IOC(direction: int, kind: int, nr: int, size: int) -> int:
    """The kernel's ``_IOC`` macro."""
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return ((direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT)
            | (kind << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT))


def _IO(kind: int, nr: int) -> int:
    """No argument struct (an integer argument at most)."""
    return _IOC(_IOC_NONE, kind, nr, 0)


def _IOR(kind: int, nr: int, ctype: CType) -> int:
    """The kernel writes ``ctype`` for userspace to read."""
    return _IOC(_IOC_READ, kind, nr, sizeof(ctype))


def _IOW(kind: int, nr: int, ctype: CType) -> int:
    """Userspace writes ``ctype`` for the kernel to read."""
    return _IOC(_IOC_WRITE, kind, nr, sizeof(ctype))


def _IOWR(kind: int, nr: int, ctype: CType) -> int:
    """Both directions."""
    return _IOC(_IOC_READ | _IOC_WRITE, kind, nr, sizeof(ctype))


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


# ----------------------------------------------------------------------- ioctls and caps


class Ioctl(enum.IntEnum):
    """The KVM ioctls devstate issues, numbered as ``linux/kvm.h`` defines them."""

    # /dev/kvm
    KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
    KVM_CREATE_VM = _IO(KVMIO, 0x01)
    KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
    KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)  # on /dev/kvm and on a VM fd
    KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
    # VM fd
    KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
    KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
    KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
    KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
    # _IOR although userspace writes: a historical ABI mistake the kernel keeps. Copied as is.
    KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
    KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
    KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, kvm_clock_data)
    KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, kvm_clock_data)
    KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
    KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)
    # vCPU fd
    KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
    KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
    KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
    KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
    KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
    KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
    KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
    KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
    KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
    KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
    KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
    KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
    KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
    KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
    KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
    KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
    KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
    KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
    KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)
    KVM_GET_SREGS2 = _IOR(KVMIO, 0xCC, kvm_sregs2)
    KVM_SET_SREGS2 = _IOW(KVMIO, 0xCD, kvm_sregs2)
    KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, kvm_xsave)


class Cap(enum.IntEnum):
    """``KVM_CAP_*`` numbers for ``KVM_CHECK_EXTENSION``."""

    IRQCHIP = 0
    NR_VCPUS = 9  # recommended maximum number of vCPUs
    MP_STATE = 14
    PIT2 = 33
    PIT_STATE2 = 35
    ADJUST_CLOCK = 39  # answers a mask of the ClockFlags KVM_GET_CLOCK can report
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    MAX_VCPUS = 66  # maximum number of vCPUs per VM
    TSC_DEADLINE_TIMER = 72
    SPLIT_IRQCHIP = 121
    MAX_VCPU_ID = 128  # vCPU ids are below this (defaults to MAX_VCPUS)
    GET_MSR_FEATURES = 153
    NESTED_STATE = 157
    EXCEPTION_PAYLOAD = 164
    SREGS2 = 200
    XSAVE2 = 208  # on the VM fd: the XSAVE buffer size in bytes, at least 4096


# --------------------------------------------------------------------- the one ioctl call

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
libc.ioctl.restype = ctypes.c_int
_libc_ioctl = libc.ioctl
_BY_ADDRESS = (ctypes.Structure, ctypes.Array)

IoctlArg = ctypes.Structure | ctypes.Array[Any] | int | None


class IoctlFn(Protocol):
    """The signature of :func:`ioctl`, so that a caller can inject a recorder or a fake."""

    def __call__(self, fd: int, request: int, arg: IoctlArg = None, *,
                 device: str = "kvm") -> int: ...


class KvmError(DeviceError, OSError):
    """A KVM ioctl failed: a :class:`DeviceError` naming the device and ioctl, and an
    :class:`OSError` carrying the errno, so callers can match either way."""

    def __init__(self, device: str, op: str, err: int) -> None:
        name = errno_codes.errorcode.get(err, str(err))
        DeviceError.__init__(self, device, f"{op} failed: {name} ({os.strerror(err)})", err)
        self.op = op

    def __reduce__(self) -> tuple[type[KvmError], tuple[str, str, int]]:
        # Rebuilt from its parts, so that it crosses a process boundary (pickle) intact.
        return (KvmError, (self.device, self.op, self.errno or 0))


def ioctl_name(request: int) -> str:
    """The ioctl's name for messages, or its number when devstate does not define it."""
    try:
        return Ioctl(request).name
    except ValueError:
        return f"ioctl {request:#x}"


def ioctl(fd: int, request: int, arg: IoctlArg = None, *, device: str = "kvm") -> int:
    """Issue one KVM ioctl; return its non-negative result or raise :class:`KvmError`.

    ``arg`` is a ctypes object passed by address, an integer passed by value (the
    ``_IO`` ioctls that take one, e.g. a vCPU id or a capability), or None.
    """
    value = arg
    if isinstance(arg, _BY_ADDRESS):
        # SAFETY: ``arg`` keeps the object alive until libc.ioctl returns, and the kernel
        # touches its memory only during that synchronous call.
        value = ctypes.addressof(arg)
    ret: int = _libc_ioctl(fd, request, value)
    if ret < 0:
        raise KvmError(device, ioctl_name(request), ctypes.get_errno())
    return ret
