"""How a vCPU's ``KVM_RUN`` ended: the parts of ``struct kvm_run`` the runner reads and
writes, the exit reasons, and a fault (an exit the runner cannot go on from) in words.

Runs in: the VM's owner (:mod:`.run` and its engines) and whoever reads a fault.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from devstate.devices.kvm.uapi import KvmError
from devstate.errors import DeviceError

# struct kvm_run (linux/kvm.h): what the runner reads and writes of it.
IMMEDIATE_EXIT = 1  # u8
EXIT_REASON = struct.Struct("=I")  # at 8
_UNION = 32  # the exit's details
SNAPSHOT_BYTES = _UNION + 256  # header and exit union: what a fault keeps (_run.c too)
_IO = struct.Struct("=BBHIQ")  # direction (0 in, 1 out), size, port, count, data_offset
_MMIO = struct.Struct("=Q8sIB")  # phys_addr, data, len, is_write
_FAIL_ENTRY = struct.Struct("=QI")  # hardware_entry_failure_reason, cpu
_INTERNAL = struct.Struct("=II")  # suberror, ndata
_SUBERRORS = {1: "instruction emulation failed", 2: "an exception while delivering one",
              3: "event delivery failed", 4: "an exit reason KVM does not handle"}


class ExitReason(enum.IntEnum):
    """``KVM_EXIT_*``: why KVM_RUN returned (those an x86 VM can see)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37


@dataclass(frozen=True, slots=True)
class VcpuFault:
    """How a vCPU's KVM_RUN ended where the runner could not go on: ``errno`` if the ioctl
    failed, else ``reason`` (a ``KVM_EXIT_*`` number) and ``detail`` in words."""

    vcpu_id: int
    errno: int
    reason: int
    detail: str

    @classmethod
    def of(cls, vcpu_id: int, err: int, snapshot: bytes) -> VcpuFault:
        """The fault from KVM_RUN's errno and its ``kvm_run`` at the time."""
        reason = EXIT_REASON.unpack_from(snapshot, 8)[0]
        return cls(vcpu_id, err, 0 if err else reason, "" if err else _describe(reason, snapshot))

    @property
    def device(self) -> str:
        """The vCPU's device id, ``cpu/N``."""
        return f"cpu/{self.vcpu_id}"

    def error(self) -> DeviceError:
        """The fault as the error a caller gets."""
        if self.errno:
            return KvmError(self.device, "KVM_RUN", self.errno)
        return DeviceError(self.device, f"KVM_RUN exited with {self.detail}")


def _describe(reason: int, snapshot: bytes) -> str:
    try:
        name = ExitReason(reason).name
    except ValueError:
        return f"exit reason {reason}, which the runner does not know"
    if reason == ExitReason.SHUTDOWN:
        return f"{name}: the guest triple-faulted (or asked for a shutdown)"
    if reason == ExitReason.IO:
        direction, size, port, count, _ = _IO.unpack_from(snapshot, _UNION)
        way = "out to" if direction else "in from"
        return (f"{name}: {count} x {size}-byte {way} port {port:#x}, which no device of "
                "this VM handles")
    if reason == ExitReason.MMIO:
        address, _, length, is_write = _MMIO.unpack_from(snapshot, _UNION)
        way = "write" if is_write else "read"
        return (f"{name}: a {length}-byte {way} at guest-physical {address:#x}, outside the "
                "guest's RAM")
    if reason == ExitReason.INTERNAL_ERROR:
        suberror, _ = _INTERNAL.unpack_from(snapshot, _UNION)
        return f"{name}: {_SUBERRORS.get(suberror, f'suberror {suberror}')}"
    if reason == ExitReason.FAIL_ENTRY:
        why, cpu = _FAIL_ENTRY.unpack_from(snapshot, _UNION)
        return f"{name}: hardware entry failure reason {why:#x} on host CPU {cpu}"
    return name
