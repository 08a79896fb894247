"""Getting records into arena slots and putting them back, with no channel: one side alone.

The cost model probes a sample of a worker's records before the stop (their get and put
cost depends on the host), and the scaling benchmarks measure each side apart (both sides
share the cores of one host). A snapshot holds its record slots until it is restored or
replaced, so the records are put back exactly as they were got.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from devstate.arena.slots import Slot, SlotPool
from devstate.devices import Device, RecordDevice


class RecordProbe:
    """The snapshot of a worker's records: the slots holding them, and each one's length."""

    def __init__(self, worker: int, slots: SlotPool, record_class: int) -> None:
        self._worker = worker
        self._slots = slots
        self._class = record_class
        self._held: list[tuple[Slot, int]] = []

    @property
    def holding(self) -> bool:
        """Whether a snapshot holds record slots now."""
        return bool(self._held)

    def snapshot(self, devices: Iterable[Device], count: int | None) -> tuple[int, int]:
        """Get the first ``count`` record devices (all with None) into slots; return the
        ns the gets took and how many there were."""
        self.release()
        records = [d for d in devices if isinstance(d, RecordDevice)][:count]
        for _ in records:
            slot = self._slots.acquire_nowait(self._class)
            if slot is None:
                self.release()
                raise RuntimeError(f"worker {self._worker}: {len(records)} records need as "
                                   "many record slots "
                                   "(raise MigrationParams.record_slots)")
            self._held.append((slot, 0))
        start = time.perf_counter_ns()
        for n, device in enumerate(records):
            slot = self._held[n][0]
            self._held[n] = (slot, device.get(slot.view))
        return time.perf_counter_ns() - start, len(records)

    def restore(self, devices: Iterable[Device]) -> int:
        """Put every record of the snapshot back; return the ns the puts took."""
        records = [d for d in devices if isinstance(d, RecordDevice)][:len(self._held)]
        start = time.perf_counter_ns()
        for device, (slot, length) in zip(records, self._held, strict=True):
            # A batched record (a KVM vCPU) goes back as a migration's put does, without
            # reading it back: a readback would judge KVM's own event handling, not the
            # record (seen with a running guest: "exception.pending: saved 0x1, read back
            # 0x0", KVM having moved a pending exception on between the put and the get).
            batch = device.batch
            if batch is not None:
                batch.put_many([device], [slot.view[:length]], readback=False)
            else:
                device.put(slot.view[:length])
        elapsed = time.perf_counter_ns() - start
        self.release()
        return elapsed

    def release(self) -> None:
        """Give the snapshot's slots back."""
        for slot, _ in self._held:
            self._slots.release(slot)
        self._held.clear()
