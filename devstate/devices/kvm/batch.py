"""The vCPUs of one KVM VM as a batch: got and put many to a call by the VM's engine.

Runs in: the VM's owner, on its threads (:mod:`devstate.worker.threads`); calls on
different threads take disjoint vCPUs. The engine (:mod:`.engine`) is chosen once per
VM; what the calls cost is added up for the report (:class:`~devstate.report.vcpus.VcpuCost`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol, cast

from devstate.devices.base import RecordBatch, RecordDevice
from devstate.devices.kvm.engine import BatchCost, EngineName, make_engine
from devstate.devices.kvm.vcpu import KvmVcpu
from devstate.devices.kvm.vm import KvmVm
from devstate.report.vcpus import VcpuCost


class VcpuBatch(RecordBatch):
    """The vCPUs of one KVM VM, got and put many to a call by the VM's engine.

    Adds up what its calls cost (from any thread) until :meth:`take_cost`.
    """

    def __init__(self, vm: KvmVm) -> None:
        self.engine = make_engine(vm.layout)
        self._record_bytes = vm.layout.record_bytes
        self._lock = threading.Lock()
        self._cost = BatchCost()
        self._threads = 1

    def threads(self, cpus: int, wanted: int | None) -> int:
        """``wanted``, else one per CPU natively; ctypes gains nothing from more than one.
        The count is remembered: the cost report says how many threads ran."""
        self._threads = wanted or (cpus if self.engine.name is EngineName.NATIVE else 1)
        return self._threads

    def get_many(self, devices: Sequence[RecordDevice], outs: Sequence[memoryview]) -> int:
        """Get the vCPUs into their slots; every record is the VM's record size."""
        self._add(self.engine.get(_vcpus(devices), outs))
        return self._record_bytes

    def put_many(self, devices: Sequence[RecordDevice], records: Sequence[memoryview], *,
                 readback: bool = True) -> None:
        """Put the records; with ``readback``, check each vCPU's readback."""
        self._add(self.engine.put(_vcpus(devices), records, verify=readback))

    def _add(self, cost: BatchCost) -> None:
        with self._lock:
            self._cost += cost

    def take_cost(self) -> VcpuCost:
        """What the calls since the last take cost, and start counting again."""
        with self._lock:
            cost, self._cost = self._cost, BatchCost()
        return VcpuCost(self.engine.name, self._threads, 1, cost.state_ns, cost.verify_ns)


class HoldsVcpu(Protocol):
    """A device of the batch: it holds one open vCPU of the VM."""

    def opened(self) -> KvmVcpu:
        """The vCPU; DeviceError if it is not open."""


def _vcpus(devices: Sequence[RecordDevice]) -> list[KvmVcpu]:
    return [cast(HoldsVcpu, device).opened() for device in devices]
