"""``kvm``: real vCPUs in KVM, all in one KVM VM owned by worker 0, as a guest's are.

With them come the VM-level devices (``vm/pit``, ``vm/clock``, ``vm/irqchip``: the PIT,
kvmclock, and the PICs and IOAPIC), owned by the same worker and loaded before its vCPUs.

Runs in: the worker that owns the VM. A KVM VM answers only the process that created
it (any other gets EIO: the owner rule), so the VM is created, held and closed by that
worker's :class:`~devstate.devices.host.DeviceHost`; ``cpu/17`` is vCPU id 17 on either
side. (The ``sharded_vms`` experiment gives each worker a VM of its own for its share.)

The vCPUs of a VM get and put as a :class:`VcpuBatch`: many to a call of the VM's engine
(:mod:`.engine`: native steps with the GIL released, or ctypes), on the owner's threads,
records read and written in their arena slots. A put is verified where it happens: the
engine reads the vCPU back and compares it with the record it loaded; any difference not
covered by a listed tolerance fails the put. The device digest is the record's stable
digest (tolerated fields zeroed), so both sides can be compared after.
"""

from __future__ import annotations

import functools

import xxhash

from devstate.config.spec import KVM_VM_DEVICES, DeviceSpec
from devstate.devices.base import RecordDevice
from devstate.devices.host import DeviceHost
from devstate.devices.kvm.batch import VcpuBatch
from devstate.devices.kvm.vcpu import KvmVcpu
from devstate.devices.kvm.vm import VM_SAVE_ORDER, VOLATILE_FIELDS, KvmVm, VmSection, vm_state_bytes
from devstate.errors import DeviceError

# The VM-level devices and the parts of the VM state each one carries, in restore order
# (Firecracker's: PIT, clock, irqchips); all load before any vCPU of the VM.
VM_DEVICES: dict[str, tuple[VmSection, ...]] = {
    "vm/pit": (VmSection.PIT2,),
    "vm/clock": (VmSection.CLOCK,),
    "vm/irqchip": (VmSection.PIC_MASTER, VmSection.PIC_SLAVE, VmSection.IOAPIC),
}
assert tuple(s for parts in VM_DEVICES.values() for s in parts) == VM_SAVE_ORDER
assert tuple(VM_DEVICES) == KVM_VM_DEVICES  # the table's names and order
# kvmclock may only move forward between a set and the readback, and not by much.
CLOCK_TOLERANCE_NS = 10 * 10**9


def vm_device_bytes(device_id: str) -> int:
    """The record size of a VM-level device."""
    return vm_state_bytes(VM_DEVICES[device_id])

@functools.cache
def host_record_bytes() -> int:
    """The size of a vCPU record on this host (XSAVE size and usable MSRs vary by host).

    Probed once per process with a VM of its own; both sides of a migration on one host
    agree, and the handshake refuses two hosts that do not.
    """
    with KvmVm(name="kvm-probe") as vm:
        return vm.layout.record_bytes


class KvmVcpuDevice(RecordDevice):
    """One real vCPU, in its owner worker's KVM VM."""

    def __init__(self, spec: DeviceSpec, machine_seed: int, *, incoming: bool = False,
                 host: DeviceHost) -> None:
        super().__init__(spec, machine_seed)
        self._host = host
        self.vcpu_id = int(spec.id.split("/", 1)[1])
        self._incoming = incoming
        self._vcpu: KvmVcpu | None = None
        self._scratch = bytearray()

    @property
    def batch(self) -> VcpuBatch:
        """The VM's batch: its vCPUs get and put together."""
        return self._host.vcpu_batch()

    async def open(self) -> None:
        """Create the vCPU in this worker's VM; a source vCPU gets its seeded state (unless
        the machine runs a guest)."""
        if self._vcpu is not None:
            return
        vm = self._host.kvm_vm()
        self._host.vcpu_batch()  # its engine's programs are made now, not at the stop
        self._vcpu = vm.create_vcpu(self.vcpu_id)
        self._scratch = bytearray(vm.layout.record_bytes)
        if not self._incoming and not self._host.live:  # a live guest's vCPUs enter its
            self._vcpu.seed_state(self.machine_seed)            # program instead

    async def close(self) -> None:
        """Close the vCPU fd, and the VM with its last vCPU."""
        if self._vcpu is not None:
            self._vcpu = None
            self._host.release_vcpu(self.vcpu_id)

    def opened(self) -> KvmVcpu:
        """The vCPU; DeviceError if it is not open."""
        if self._vcpu is None:
            raise DeviceError(self.id, "the vCPU is not open")
        return self._vcpu

    async def digest(self) -> bytes:
        """The stable digest of the vCPU's current state."""
        vcpu = self.opened()
        vcpu.get(memoryview(self._scratch))
        return vcpu.stable_digest(self._scratch)

    def get(self, out: memoryview) -> int:
        """Read the vCPU from KVM into ``out`` (the VM is stopped)."""
        return self.batch.get_many([self], [out])

    def put(self, data: memoryview) -> None:
        """Load a record into KVM, read it back, and fail on any unexplained difference."""
        self.batch.put_many([self], [data])


class KvmVmPartDevice(RecordDevice):
    """A part of the VM-level state of this worker's KVM VM (PIT, clock or irqchips)."""

    def __init__(self, spec: DeviceSpec, machine_seed: int, *, incoming: bool = False,
                 host: DeviceHost) -> None:
        super().__init__(spec, machine_seed)
        self._host = host
        self._sections = VM_DEVICES[spec.id]

    async def open(self) -> None:
        """Make sure this worker's VM exists (its irqchip and PIT come with it)."""
        self._host.kvm_vm()

    def get(self, out: memoryview) -> int:
        """Read this part of the VM state into ``out``."""
        record = self._host.kvm_vm().get_state(self._sections)
        out[:len(record)] = record
        return len(record)

    def put(self, data: memoryview) -> None:
        """Load this part, read it back, and fail unless only volatile fields moved."""
        vm = self._host.kvm_vm()
        vm.put_state(data, self._sections)
        readback = vm.get_state(self._sections)
        if self._stable(readback) != self._stable(data):
            raise DeviceError(self.id, "put: the readback differs outside the fields the "
                                       "kernel changes (count_load_time, clock)")
        if VmSection.CLOCK in self._sections:
            saved, now = (self._clock(vm, r) for r in (data, readback))
            if not 0 <= now - saved <= CLOCK_TOLERANCE_NS:
                raise DeviceError(self.id, f"put: kvmclock read back {now - saved} ns from "
                                           "the saved value")

    async def digest(self) -> bytes:
        """Digest of this part with its volatile fields zeroed."""
        return self._stable(self._host.kvm_vm().get_state(self._sections))

    def _stable(self, record: bytes | memoryview) -> bytes:
        copy = bytearray(record)
        sections = self._host.kvm_vm().parse_state(copy, self._sections)
        for section, offset, size in VOLATILE_FIELDS:
            if section in sections:
                sections[section][offset:offset + size] = bytes(size)
        return xxhash.xxh3_128_digest(copy)

    def _clock(self, vm: KvmVm, record: bytes | memoryview) -> int:
        return int.from_bytes(vm.parse_state(record, self._sections)[VmSection.CLOCK][:8],
                              "little")
