"""What the devices owned by one process share: that process's KVM VM and its vCPU batch.

A KVM VM answers only the process that created it (the owner rule, ARCHITECTURE.md §3),
so the worker that owns the kvm vCPUs holds the VM, made when its first vCPU (or VM-level
device) opens and closed with its last vCPU, and the batch its vCPUs get and put with.
The worker creates one :class:`DeviceHost` and hands it to every device it makes;
nothing here is module-global.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devstate.devices.kvm.batch import VcpuBatch
    from devstate.devices.kvm.vm import KvmVm
    from devstate.report.vcpus import VcpuCost


class DeviceHost:
    """One process's shared device resources."""

    def __init__(self) -> None:
        self._vm: KvmVm | None = None
        self._batch: VcpuBatch | None = None

    def kvm_vm(self) -> KvmVm:
        """This process's KVM VM, created on first use (irqchip and PIT before any vCPU)."""
        if self._vm is None:
            from devstate.devices.kvm.vm import KvmVm  # only kvm machines pay for ctypes

            self._vm = KvmVm(name="kvm-shard")
        return self._vm

    def vcpu_batch(self) -> VcpuBatch:
        """The batch the VM's vCPUs get and put with (its engine chosen once, here)."""
        if self._batch is None:
            from devstate.devices.kvm.batch import VcpuBatch

            self._batch = VcpuBatch(self.kvm_vm())
        return self._batch

    @property
    def batch(self) -> VcpuBatch | None:
        """The VM's batch, if this process has a VM (None: no batched records here)."""
        return self._batch

    def vcpu_cost(self) -> VcpuCost | None:
        """What the vCPUs cost since the last ask (None: this process has no vCPUs)."""
        return self._batch.take_cost() if self._batch is not None else None

    def release_vcpu(self, vcpu_id: int) -> None:
        """Close a vCPU of this process's VM, and the VM with its last vCPU."""
        if self._vm is None:
            return
        self._vm.close_vcpu(vcpu_id)
        if not self._vm.vcpus:
            self._vm.close()
            self._vm = self._batch = None
