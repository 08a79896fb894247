"""The KVM x86 ioctls a VMM needs to migrate vCPUs and VM-level state, and the one call.

Runs in: any process; the calls work only in the process that created the VM (the owner
rule, ARCHITECTURE.md section 3). The numbers are encoded from the structs of
:mod:`.structs` as ``linux/kvm.h`` does; ``tests/test_kvm_uapi.py`` compiles a C program
against the kernel headers and asserts every number here.

Every ioctl goes through :func:`ioctl`: libc's ``ioctl`` called through ctypes, which
releases the GIL for the call and passes buffers in place. ``fcntl.ioctl`` would copy
buffers of up to 1 KiB, hold the GIL for larger ones and refuse immutable ones over 1 KiB
(shared/reference/kvm-vcpu-state.md, "fcntl.ioctl quirks").
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_codes
import os
from ctypes import sizeof
from typing import Any, Protocol

from devstate.devices.kvm import structs
from devstate.errors import DeviceError

KVM_API_VERSION = 12  # the only version since Linux 2.6.22; anything else is another ABI
KVMIO = 0xAE

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

CType = type[ctypes.Structure] | type[ctypes.c_uint64]


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


# ----------------------------------------------------------------------- ioctls and caps


class Ioctl(enum.IntEnum):
    """The KVM ioctls devstate issues, numbered as ``linux/kvm.h`` defines them."""

    # /dev/kvm
    KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
    KVM_CREATE_VM = _IO(KVMIO, 0x01)
    KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, structs.kvm_msr_list)
    KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)  # on /dev/kvm and on a VM fd
    KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, structs.kvm_cpuid2)
    KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)  # the size of a vCPU's struct kvm_run mapping
    # VM fd
    KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
    KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, structs.kvm_dirty_log)
    KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, structs.kvm_userspace_memory_region)
    KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
    KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
    KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
    KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, structs.kvm_irqchip)
    # _IOR although userspace writes: a historical ABI mistake the kernel keeps. Copied as is.
    KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, structs.kvm_irqchip)
    KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, structs.kvm_pit_config)
    KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, structs.kvm_clock_data)
    KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, structs.kvm_clock_data)
    KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, structs.kvm_pit_state2)
    KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, structs.kvm_pit_state2)
    # vCPU fd
    KVM_RUN = _IO(KVMIO, 0x80)
    KVM_GET_REGS = _IOR(KVMIO, 0x81, structs.kvm_regs)
    KVM_SET_REGS = _IOW(KVMIO, 0x82, structs.kvm_regs)
    KVM_GET_SREGS = _IOR(KVMIO, 0x83, structs.kvm_sregs)
    KVM_SET_SREGS = _IOW(KVMIO, 0x84, structs.kvm_sregs)
    KVM_GET_MSRS = _IOWR(KVMIO, 0x88, structs.kvm_msrs)
    KVM_SET_MSRS = _IOW(KVMIO, 0x89, structs.kvm_msrs)
    KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, structs.kvm_lapic_state)
    KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, structs.kvm_lapic_state)
    KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, structs.kvm_cpuid2)
    KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, structs.kvm_mp_state)
    KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, structs.kvm_mp_state)
    KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, structs.kvm_vcpu_events)
    KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, structs.kvm_vcpu_events)
    KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, structs.kvm_debugregs)
    KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, structs.kvm_debugregs)
    KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, structs.kvm_xsave)
    KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, structs.kvm_xsave)
    KVM_GET_XCRS = _IOR(KVMIO, 0xA6, structs.kvm_xcrs)
    KVM_SET_XCRS = _IOW(KVMIO, 0xA7, structs.kvm_xcrs)
    KVM_GET_SREGS2 = _IOR(KVMIO, 0xCC, structs.kvm_sregs2)
    KVM_SET_SREGS2 = _IOW(KVMIO, 0xCD, structs.kvm_sregs2)
    KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, structs.kvm_xsave)


class Cap(enum.IntEnum):
    """``KVM_CAP_*`` numbers for ``KVM_CHECK_EXTENSION``."""

    IRQCHIP = 0
    NR_VCPUS = 9  # recommended maximum number of vCPUs
    MP_STATE = 14
    PIT2 = 33
    PIT_STATE2 = 35
    ADJUST_CLOCK = 39  # answers a mask of the structs.ClockFlags KVM_GET_CLOCK can report
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
    IMMEDIATE_EXIT = 136  # kvm_run.immediate_exit: KVM_RUN returns EINTR at once
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
