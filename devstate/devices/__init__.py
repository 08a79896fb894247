"""Device backends, one module each, behind the interface in :mod:`devstate.devices.base`.

:func:`make_device` is the one place that maps a spec's backend to its class, so a new
device type is one new module plus one line here.
"""

from __future__ import annotations

from devstate.config.spec import Backend, DeviceSpec
from devstate.devices.base import Device, RecordDevice, StreamDevice


def record_bytes(backend: Backend) -> int:
    """Upper bound of one record of a record backend (0 for stream backends)."""
    if backend is Backend.SIM_VCPU:
        from devstate.devices.vcpu_sim import RECORD_BYTES

        return RECORD_BYTES
    if backend is Backend.KVM:
        from devstate.devices.kvm.device import host_record_bytes

        return host_record_bytes()
    return 0


def make_device(spec: DeviceSpec, machine_seed: int, *, incoming: bool) -> Device:
    """Build (not yet open) the device object for one device of the machine.

    An ``incoming`` device starts blank, waiting for a migration to load it; otherwise it
    starts with the machine's seeded state.
    """
    if spec.backend is Backend.SIM_VCPU:
        from devstate.devices.vcpu_sim import SimVcpu

        return SimVcpu(spec, machine_seed, incoming=incoming)
    if spec.backend is Backend.KVM:
        from devstate.devices.kvm.device import KvmVcpuDevice

        return KvmVcpuDevice(spec, machine_seed, incoming=incoming)
    if spec.backend is Backend.KVM_VM:
        from devstate.devices.kvm.device import KvmVmPartDevice

        return KvmVmPartDevice(spec, machine_seed, incoming=incoming)
    if spec.backend is Backend.VFIO_SIM:
        from devstate.devices.vfio.sim import VfioSimDevice

        return VfioSimDevice(spec, machine_seed, incoming=incoming)
    raise AssertionError(f"no device class for backend {spec.backend}")


__all__ = ["Device", "RecordDevice", "StreamDevice", "make_device", "record_bytes"]
