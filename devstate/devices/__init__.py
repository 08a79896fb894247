"""Device backends, one module each, behind the interface in :mod:`devstate.devices.base`.

:func:`make_device` is the one place that maps a spec's backend to its class, so a new
device type is one new module plus one line here; :func:`device_table` gives a machine's
device table with the record sizes only the backends know.

Runs in: workers (the devices, owned there), device-model processes (``vfio/model``) and
coordinators (the device table). May import config, net, lifecycle and errors; never
planning, worker, migration, qmp or cli.
"""

from __future__ import annotations

from devstate.config.spec import Backend, DeviceSpec, DeviceTable, MachineConfig
from devstate.devices.base import Device, RecordDevice, StreamDevice
from devstate.devices.host import DeviceHost


def record_size(backend: Backend, device_id: str) -> int:
    """Upper bound of one record of a record device (0 for stream backends)."""
    if backend is Backend.SIM_VCPU:
        from devstate.devices.vcpu_sim import RECORD_BYTES

        return RECORD_BYTES
    if backend is Backend.KVM:
        from devstate.devices.kvm.device import host_record_bytes

        return host_record_bytes()
    if backend is Backend.KVM_VM:
        from devstate.devices.kvm.device import vm_device_bytes

        return vm_device_bytes(device_id)
    return 0


def device_table(machine: MachineConfig) -> DeviceTable:
    """The machine's device table with every record's size on this host (a kvm vCPU's is
    probed with a VM of its own, once per process): build it once per machine and side."""
    return machine.table(record_size)


def make_device(spec: DeviceSpec, machine_seed: int, *, incoming: bool,
                host: DeviceHost) -> Device:
    """Build (not yet open) the device object for one device of the machine.

    An ``incoming`` device starts blank, waiting for a migration to load it; otherwise it
    starts with the machine's seeded state. ``host`` is what the process's devices share
    (its KVM VM): one per owner process.
    """
    if spec.backend is Backend.SIM_VCPU:
        from devstate.devices.vcpu_sim import SimVcpu

        return SimVcpu(spec, machine_seed, incoming=incoming)
    if spec.backend is Backend.KVM:
        from devstate.devices.kvm.device import KvmVcpuDevice

        return KvmVcpuDevice(spec, machine_seed, incoming=incoming, host=host)
    if spec.backend is Backend.KVM_VM:
        from devstate.devices.kvm.device import KvmVmPartDevice

        return KvmVmPartDevice(spec, machine_seed, incoming=incoming, host=host)
    if spec.backend is Backend.GUEST_RAM:
        from devstate.devices.kvm.memory import RamRange

        return RamRange(spec, machine_seed, incoming=incoming, host=host)
    if spec.backend is Backend.VFIO_SIM:
        from devstate.devices.vfio.sim import VfioSimDevice

        return VfioSimDevice(spec, machine_seed, incoming=incoming)
    raise AssertionError(f"no device class for backend {spec.backend}")


__all__ = ["Device", "DeviceHost", "RecordDevice", "StreamDevice", "device_table", "make_device",
           "record_size"]
