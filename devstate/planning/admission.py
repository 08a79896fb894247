"""Which streams move now: stop-and-copy admits streams to the transfer in the plan's order.

Runs in: every source worker, during a concurrent Save (after the switchover, if precopy).

Streams share one resource, the host's copy bandwidth (both sides' copies of every byte,
on the cores they share, or the link when ``--max-bandwidth`` caps it). Sharing it fairly
among every stream at once makes them all finish late, so the firmware of each starts
late too. One link and work after each stream's last byte (its firmware, what loads after
it) is the single-machine problem with delivery times, which ordering streams by that
tail, longest first, solves (Jackson's rule). So a stream waits at the gate until the
streams before it in the transfer order that are still moving no longer fill the
``budget`` (bytes/s); the first one never waits, so the transfer never stalls.

A guest's RAM ranges are one stream cut into pieces for the pool, not streams of their
own: they have no tail (no firmware, nothing loads after them), so they never hold each
other, and they hold the streams behind them as one stream at the RAM's rate. Held one at
a time like devices, the 48 mostly clean ranges of a 1.5 GiB guest ended one after another
at the stop, 0.2-0.4 ms apart when their owners were two workers (each waiting for the
other's note): 96 vCPUs moved in 24-26 ms with two workers per side against 15-17 with one.

Every worker holds the same order and learns of other workers' finished streams from
their notes (``handoff.Op.SENT``); a note that comes late only delays a start.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TransferOrder:
    """The streams in the order they get the host's bandwidth, with each one's rate."""

    streams: tuple[tuple[int, float], ...] = ()  # (device index, bytes/s), first first
    budget: float = math.inf  # bytes/s (> 0) the streams ahead of one may add up to
    ram: frozenset[int] = frozenset()  # the guest's RAM ranges: pieces of one stream


class Admission:
    """The gate: :meth:`turn` waits for a stream's turn, :meth:`finished` frees its share."""

    def __init__(self, order: TransferOrder) -> None:
        self._order = order
        self._rank = {index: k for k, (index, _) in enumerate(order.streams)}
        self._finished: set[int] = set()
        self._changed = asyncio.Event()

    def may_start(self, index: int) -> bool:
        """Whether the unfinished streams ahead of ``index`` leave room in the budget (a
        stream outside the order is never held)."""
        rank = self._rank.get(index)
        if rank is None:
            return True
        ram = self._order.ram
        moving = [(i, rate) for i, rate in self._order.streams[:rank] if i not in self._finished]
        ahead = sum(rate for i, rate in moving if i not in ram)
        if index not in ram:  # the RAM ahead, as one stream
            ahead += max((rate for i, rate in moving if i in ram), default=0.0)
        return ahead < self._order.budget

    async def turn(self, index: int) -> None:
        """Return once stream ``index`` may move."""
        while not self.may_start(index):
            self._changed.clear()
            await self._changed.wait()

    def finished(self, index: int) -> None:
        """Stream ``index`` has read its last byte: its share goes to the next."""
        self._finished.add(index)
        self._changed.set()
