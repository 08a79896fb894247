"""``kvm``: real vCPUs in KVM, sharded: each worker owns one KVM VM holding its vCPUs.

Runs in: the worker that owns the vCPUs. A KVM VM answers only the process that created
it (any other gets EIO: the owner rule), so every worker creates its own VM, the
*shard*, on the first vCPU it opens, and ``cpu/17`` is vCPU id 17 in whichever shard owns
it, on either side, whatever the two sides' worker counts.

A put is verified where it happens: the destination reads the vCPU back and compares it
field by field with the record it loaded (:meth:`devstate.kvm.vcpu.KvmVcpu.compare`);
any difference not covered by a listed tolerance fails the put. The device digest is the
record's stable digest (tolerated fields zeroed), so both sides can be compared after.
"""

from __future__ import annotations

import functools

from devstate.devices.base import RecordDevice
from devstate.errors import DeviceError
from devstate.kvm.vcpu import KvmVcpu
from devstate.kvm.vm import KvmVm
from devstate.spec import DeviceSpec

_shard: KvmVm | None = None


def shard() -> KvmVm:
    """This process's KVM VM, created on first use (irqchip and PIT before any vCPU)."""
    global _shard
    if _shard is None:
        _shard = KvmVm(name="kvm-shard")
    return _shard


def close_shard() -> None:
    """Close this process's VM once its last vCPU is closed."""
    global _shard
    if _shard is not None and not _shard.vcpus:
        _shard.close()
        _shard = None


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

    def __init__(self, spec: DeviceSpec, machine_seed: int, *, incoming: bool = False) -> None:
        super().__init__(spec, machine_seed)
        self.vcpu_id = int(spec.id.split("/", 1)[1])
        self._incoming = incoming
        self._vcpu: KvmVcpu | None = None
        self._scratch = bytearray()

    async def open(self) -> None:
        """Create the vCPU in this worker's VM; a source vCPU gets its seeded state."""
        if self._vcpu is not None:
            return
        vm = shard()
        self._vcpu = vm.create_vcpu(self.vcpu_id)
        self._scratch = bytearray(vm.layout.record_bytes)
        if not self._incoming:
            self._vcpu.seed_state(self.machine_seed)

    async def close(self) -> None:
        """Close the vCPU fd, and the VM with its last vCPU."""
        vcpu, self._vcpu = self._vcpu, None
        if vcpu is not None:
            shard().vcpus.pop(self.vcpu_id, None)
            vcpu.close()
            close_shard()

    def _opened(self) -> KvmVcpu:
        if self._vcpu is None:
            raise DeviceError(self.id, "the vCPU is not open")
        return self._vcpu

    async def digest(self) -> bytes:
        """The stable digest of the vCPU's current state."""
        vcpu = self._opened()
        vcpu.get(memoryview(self._scratch))
        return vcpu.stable_digest(self._scratch)

    def get(self, out: memoryview) -> int:
        """Read the vCPU from KVM into ``out`` (the VM is stopped)."""
        return self._opened().get(out)

    def put(self, data: memoryview) -> None:
        """Load a record into KVM, read it back, and fail on any unexplained difference."""
        vcpu = self._opened()
        vcpu.put(data)
        vcpu.get(memoryview(self._scratch))
        unexplained = [d for d in vcpu.compare(bytes(data), bytes(self._scratch))
                       if not d.explained]
        if unexplained:
            shown = "; ".join(str(d) for d in unexplained[:3])
            raise DeviceError(self.id, f"put: the readback differs in {len(unexplained)} "
                                       f"field(s): {shown}")
