"""What a worker lends the Save or Load it runs: its devices, slots, channels and links."""

from __future__ import annotations

import socket
from concurrent.futures import Executor
from dataclasses import dataclass

from devstate.arena.slots import SlotPool
from devstate.devices import Device
from devstate.devices.base import RecordBatch
from devstate.worker.handoff import Mesh
from devstate.worker.layout import CHUNK_CLASS, RECORD_CLASS


@dataclass(frozen=True, slots=True)
class Holdings:
    """One worker's share of the side, as its Save or Load uses it.

    ``arena`` is a view of the whole arena (handoffs reach other workers' slots);
    ``batch`` gets and puts the worker's batched records (its KVM VM's vCPUs: a worker
    owns one VM at most) on ``executor``, the owner's threads, in ``threads`` lanes
    (None: no batched records here).
    """

    worker: int
    devices: dict[int, Device]
    slots: SlotPool
    arena: memoryview
    channels: dict[int, socket.socket]
    mesh: Mesh | None
    batch: RecordBatch | None = None
    executor: Executor | None = None
    threads: int = 1
    record_class: int = RECORD_CLASS
    chunk_class: int = CHUNK_CLASS
