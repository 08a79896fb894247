"""Which worker owns which device, and in what order each worker saves its devices.

Owners: a greedy longest-first assignment (LPT) balances each worker's own work (the
copies of stream bytes, record gets and puts; :func:`work_s`), the simplest list schedule
that keeps the largest devices apart. Order: lower load classes first, then streams, the
longest own path (:func:`path_s`: rates and firmware) first. What the plan will cost is
:mod:`devstate.cost`'s to say. :func:`spec_order_plan` is the baseline it must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

from devstate.cost import HostCosts
from devstate.spec import Backend, DeviceSpec, MachineSpec, Shape


@dataclass(frozen=True, slots=True)
class Plan:
    """Owners and per-worker save order; the same on both sides of a migration."""

    workers: int
    owner: tuple[int, ...]            # owner[device index] = worker
    order: tuple[tuple[int, ...], ...]  # order[worker] = device indices, in save order

    def devices_of(self, worker: int) -> tuple[int, ...]:
        """The devices a worker owns, in its save order."""
        return self.order[worker]


def work_s(device: DeviceSpec) -> float:
    """Seconds of a worker's own work for one device (what balancing owners balances).

    A stream costs its owner the copies of its bytes (at the host's calibrated copy rate);
    its device rates and firmware are waiting, not work, and belong to :func:`path_s`.
    """
    if device.vfio is None and device.vcpu is None:
        return 0.0  # VM-level state: a few ioctls
    if device.vcpu is not None:
        return (device.vcpu.get_us + device.vcpu.put_us) * 1e-6
    assert device.vfio is not None
    return device.vfio.size / HostCosts().copy_bytes_per_s


def path_s(device: DeviceSpec) -> float:
    """Seconds of a device's own path: its state at its slower rate, then its firmware."""
    if device.vfio is None:
        return work_s(device)
    v = device.vfio
    return v.size / min(v.read_bandwidth, v.write_bandwidth) + v.firmware_latency_ms / 1e3


def spec_order_plan(spec: MachineSpec, workers: int) -> Plan:
    """The baseline a plan must beat: devices dealt to workers round-robin in table order,
    each worker saving them in that order (as a VMM walks its device list)."""
    if workers < 1:
        raise ValueError("a plan needs at least one worker")
    table = spec.devices()
    kvm_vm = {d.index for d in table if d.backend is Backend.KVM_VM}
    owner = tuple(0 if d.index in kvm_vm else d.index % workers for d in table)
    order = tuple(tuple(d.index for d in table if owner[d.index] == w) for w in range(workers))
    return Plan(workers, owner, order)


def make_plan(spec: MachineSpec, workers: int, *, single_vm: bool = False) -> Plan:
    """Assign every device to one of ``workers`` owners, longest estimated work first.

    Each worker's order puts lower load classes (``priority``) first, then streams before
    records, longest first: streams carry the long tails (bytes, firmware latency) that
    records can overlap with. With ``single_vm`` every kvm vCPU goes to
    worker 0, whose one VM holds them all.
    """
    if workers < 1:
        raise ValueError("a plan needs at least one worker")
    table = spec.devices()
    load = [0.0] * workers
    owner = [0] * len(table)
    # VM-level state belongs to one VM: worker 0's, whose records start with it (table
    # order), so it loads before that VM's vCPUs.
    to_worker_0 = {Backend.KVM_VM, Backend.KVM} if single_vm else {Backend.KVM_VM}
    pinned = [d for d in table if d.backend in to_worker_0]
    # Streams: longest work first to the least loaded worker. Stable sort: equal estimates
    # keep table order, so both sides compute the same plan.
    free = [d for d in table if d not in pinned]
    for device in sorted((d for d in free if d.vfio is not None), key=lambda d: -work_s(d)):
        w = min(range(workers), key=lambda k: (load[k], k))
        owner[device.index] = w
        load[w] += work_s(device)
    # Records: dealt evenly. Each is tiny next to a stream, but each costs its worker's
    # loop a get or put, and a worker's records run one after another: an even split
    # halves that serial time, where filling the lighter worker would load it all there.
    for n, device in enumerate(d for d in free if d.vfio is None):
        owner[device.index] = n % workers
    # Lower load classes first (what others load after); within a class streams first,
    # longest first: they carry the long tails (bytes, firmware) records overlap with.
    order = tuple(
        tuple(d.index for d in sorted((d for d in table if owner[d.index] == w),
                                      key=lambda d: (d.priority, d.shape is Shape.RECORD,
                                                     -path_s(d), d.index)))
        for w in range(workers))
    return Plan(workers, tuple(owner), order)
