"""What the devices owned by one process share: that process's KVM VM.

A KVM VM answers only the process that created it (the owner rule, ARCHITECTURE.md §3),
so each worker that owns kvm vCPUs holds one VM, made when its first vCPU (or VM-level
device) opens and closed with its last vCPU. The worker creates one :class:`DeviceHost`
and hands it to every device it makes; nothing here is module-global.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devstate.devices.kvm.vm import KvmVm


class DeviceHost:
    """One process's shared device resources."""

    def __init__(self) -> None:
        self._vm: KvmVm | None = None

    def kvm_vm(self) -> KvmVm:
        """This process's KVM VM, created on first use (irqchip and PIT before any vCPU)."""
        if self._vm is None:
            from devstate.devices.kvm.vm import KvmVm  # only kvm machines pay for ctypes

            self._vm = KvmVm(name="kvm-shard")
        return self._vm

    def release_vcpu(self, vcpu_id: int) -> None:
        """Close a vCPU of this process's VM, and the VM with its last vCPU."""
        if self._vm is None:
            return
        self._vm.close_vcpu(vcpu_id)
        if not self._vm.vcpus:
            self._vm.close()
            self._vm = None
