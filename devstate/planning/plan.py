"""Which worker owns which device, and in what order each worker saves its devices.

Transfer: stop-and-copy admits streams to the host's bandwidth (:mod:`devstate.planning.admission`)
longest tail first (:func:`tail_s`: what must still happen after a stream's last byte, its
firmware and what loads after it), so the longest firmware overlaps the others' bytes.

Owners: streams go longest own path first (:func:`path_s`: state at the slower rate, then
firmware) to the worker whose paths end soonest (LPT), the simplest list schedule that puts
the critical path first and keeps the longest devices apart; records are dealt evenly,
except a KVM VM's vCPUs, which all belong to its owner, worker 0. Order in each worker:
lower load classes first, VM-level state before the vCPUs of its VM, what others load
``after`` before them, then streams, the longest own path (:func:`path_s`: rates and
firmware) first. What the plan will cost is :mod:`devstate.planning.cost`'s to say.
:func:`spec_order_plan` is the baseline it must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

from devstate.config.spec import Backend, DeviceSpec, DeviceTable, Shape


@dataclass(frozen=True, slots=True)
class Plan:
    """Owners and per-worker save order; the same on both sides of a migration."""

    workers: int
    owner: tuple[int, ...]            # owner[device index] = worker
    order: tuple[tuple[int, ...], ...]  # order[worker] = device indices, in save order
    transfer: tuple[int, ...] = ()      # stream device indices, in the order they move

    def devices_of(self, worker: int) -> tuple[int, ...]:
        """The devices a worker owns, in its save order."""
        return self.order[worker]


def path_s(device: DeviceSpec) -> float:
    """Seconds of a stream's own path: its state at its slower rate, then its firmware
    (0 for a record)."""
    if device.stream is None:
        return 0.0
    v = device.stream
    return v.size / v.rate + v.firmware_latency_ms / 1e3


def tail_s(table: DeviceTable, workers: int) -> dict[int, float]:
    """Seconds of work after each stream's last byte arrives, by device index: its
    firmware, then the longest of what loads after it (a stream's own tail, or the puts of
    the records that wait for it, spread over ``workers``)."""
    dependents: dict[str, list[DeviceSpec]] = {}
    for d in table:
        for a in d.after:
            dependents.setdefault(a, []).append(d)
    tails: dict[str, float] = {}

    def of(d: DeviceSpec) -> float:
        if d.id not in tails:
            after = dependents.get(d.id, [])
            records = sum(1 for e in after if e.stream is None)
            puts = records * table.machine.vcpus.put_us / 1e6 / workers
            tails[d.id] = (d.stream.firmware_latency_ms / 1e3 if d.stream is not None else 0.0) \
                + max([puts, *(of(e) for e in after if e.stream is not None)])
        return tails[d.id]

    return {d.index: of(d) for d in table if d.stream is not None}


def _depths(table: DeviceTable) -> list[int]:
    """How many dependencies deep each device is: what others load after goes first."""
    by_id = {d.id: d for d in table}
    depth: dict[int, int] = {}

    def of(d: DeviceSpec) -> int:
        if d.index not in depth:
            depth[d.index] = 1 + max((of(by_id[a]) for a in d.after), default=-1)
        return depth[d.index]

    return [of(d) for d in table]


def spec_order_plan(table: DeviceTable, workers: int, *, sharded_vms: bool = False) -> Plan:
    """The baseline a plan must beat: devices dealt to workers round-robin in table order,
    each worker saving them in that order (as a VMM walks its device list); the KVM VM's
    state and vCPUs stay with worker 0, their owner."""
    if workers < 1:
        raise ValueError("a plan needs at least one worker")
    on_vm = set(_vm_owner_backends(sharded_vms))
    owner = tuple(0 if d.backend in on_vm else d.index % workers for d in table)
    order = tuple(tuple(d.index for d in table if owner[d.index] == w) for w in range(workers))
    return Plan(workers, owner, order, tuple(d.index for d in table if d.stream is not None))


def _vm_owner_backends(sharded_vms: bool) -> tuple[Backend, ...]:
    """What worker 0, the KVM VM's owner, must hold: the VM-level state, and the vCPUs
    unless the experiment shards them over a VM per worker."""
    return (Backend.KVM_VM,) if sharded_vms else (Backend.KVM_VM, Backend.KVM)


def make_plan(table: DeviceTable, workers: int, *, sharded_vms: bool = False) -> Plan:
    """Assign every device to one of ``workers`` owners and give each owner an order
    (see the module's docstring). Every kvm vCPU goes to worker 0, whose one VM holds them
    all, unless ``sharded_vms`` (an experiment, not a guest's shape) deals them out.
    """
    if workers < 1:
        raise ValueError("a plan needs at least one worker")
    load = [0.0] * workers
    owner = [0] * len(table)
    # A KVM VM answers only its creator (the owner rule): worker 0 holds its VM-level
    # state (first in its order, so it loads before the VM's vCPUs) and its vCPUs.
    to_worker_0 = _vm_owner_backends(sharded_vms)
    pinned = [d for d in table if d.backend in to_worker_0]
    # Streams: the longest own path first, to the worker whose paths end soonest.
    free = [d for d in table if d not in pinned]
    for device in sorted((d for d in free if d.stream is not None), key=lambda d: -path_s(d)):
        w = min(range(workers), key=lambda k: (load[k], k))
        owner[device.index] = w
        load[w] += path_s(device)
    # Records: dealt evenly. Each is tiny next to a stream, but each costs its worker's
    # loop a get or put, and a worker's records run one after another: an even split
    # halves that serial time, where filling the lighter worker would load it all there.
    for n, device in enumerate(d for d in free if d.stream is None):
        owner[device.index] = n % workers
    # Streams before records within a class: they carry the long tails (bytes, firmware)
    # that records overlap with.
    depth = _depths(table)
    order = tuple(
        tuple(d.index for d in sorted((d for d in table if owner[d.index] == w),
                                      key=lambda d: (d.priority, d.backend is not Backend.KVM_VM,
                                                     depth[d.index], d.shape is Shape.RECORD,
                                                     -path_s(d), d.index)))
        for w in range(workers))
    tail = tail_s(table, workers)
    transfer = tuple(sorted(tail, key=lambda i: (-tail[i], -path_s(table[i]), i)))
    return Plan(workers, tuple(owner), order, transfer)
