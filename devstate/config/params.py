"""Runtime settings of one side of a migration, and the arena layout they imply."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from devstate.arena.slots import Layout, SlotClass
from devstate.config.spec import MachineSpec
from devstate.net.route import Routing
from devstate.protocol import wire


class Overrun(enum.Enum):
    """What stop-and-copy does when it passes the downtime limit."""

    FINISH = "finish"  # complete, and report the overrun and its cause
    ABORT = "abort"    # cancel: the destination discards, the source resumes unchanged


# Slot classes, in this order, in every worker's partition.
RECORD_CLASS = 0
CHUNK_CLASS = 1
WINDOW_CLASS = 2


@dataclass(frozen=True, slots=True)
class Settings:
    """How one side runs: workers, mode, and the arena's shape.

    ``cpus`` pins workers; two sides on one host pass them in opposite orders so that each
    side's first worker gets a core of its own. ``chunk_bytes`` is a stream packet's
    payload: QEMU found 1 MiB as good as 128 MiB for mlx5 (hw/vfio/migration.c), and
    smaller means less memory per in-flight packet.
    ``chunk_slots`` bounds in-flight stream bytes per worker (memory vs pipelining:
    fewer slots stall a fast device behind a slow one sooner). ``record_slots`` lets a
    worker get that many records ahead of its channel. ``window_bytes`` is the receive
    window for small packets (records, END markers), read in one syscall.
    ``single_vm`` gives every kvm vCPU to worker 0, in one KVM VM, whose gets and puts run
    on a thread per usable CPU (ctypes drops the GIL during the ioctl): what a one-process
    VMM can do. The default is sharded: each worker's own VM holds its share.
    ``channels`` is the number of data channels (None: one per worker), the same setting
    for every device; ``routing`` puts a device's packets on its home channel (affinity) or
    spreads a stream's packets over all of them (:mod:`devstate.net.route`). A destination
    worker receives on at most ``window_slots`` channels (a receive window each).
    ``max_bandwidth`` (bytes/s, QEMU's max-bandwidth) limits what all channels send
    together (:mod:`devstate.net.bandwidth`); None: unlimited.
    ``spec_order`` replaces the plan (longest work first, streams before records) with
    the baseline it must beat: devices in table order, dealt round-robin.
    ``precopy`` streams the devices that support it while the VM runs, and switches over
    once the expected downtime meets the limit (or, without one, once each is down to one
    chunk), within ``precopy_timeout_s``.
    ``downtime_limit_ms`` (QEMU's downtime-limit): no switchover while the cost model
    expects more (:mod:`devstate.planning.cost`), unless ``force_switchover``; during stop-and-copy,
    passing it either finishes and reports the overrun or aborts (``overrun``).
    """

    workers: int = 2
    concurrent: bool = True
    chunk_bytes: int = 1 << 20
    chunk_slots: int = 16
    record_slots: int = 128
    window_bytes: int = 256 << 10
    cpus: tuple[int, ...] | None = None  # worker i runs on cpus[i % len]; None: usable CPUs
    single_vm: bool = False
    channels: int | None = None
    routing: Routing = Routing.AFFINITY
    window_slots: int = 4
    max_bandwidth: float | None = None
    spec_order: bool = False
    precopy: bool = False
    precopy_timeout_s: float = 10.0
    downtime_limit_ms: float | None = None
    overrun: Overrun = Overrun.FINISH
    force_switchover: bool = False
    fault: str | None = None  # tests: a fault for every worker to arm (devstate.worker.faults)

    @property
    def data_channels(self) -> int:
        """How many data channels a migration from this side opens."""
        return self.channels or self.workers

    @property
    def record_threads(self) -> int:
        """Threads a worker gets and puts kvm vCPUs with: one per usable CPU if single-vm."""
        return len(self.cpus or os.sched_getaffinity(0)) if self.single_vm else 1

    def layout(self, spec: MachineSpec) -> Layout:
        """The arena layout for this machine: the same on both sides."""
        from devstate.devices import record_bytes

        record = wire.PACKET_HEADER_BYTES + max(record_bytes(spec.vcpus.backend), 64)
        window = max(self.window_bytes, 4 * record)
        return Layout(self.workers, (
            SlotClass(record, self.record_slots),
            SlotClass(wire.PACKET_HEADER_BYTES + self.chunk_bytes, self.chunk_slots),
            SlotClass(window, self.window_slots),
        ))
