"""The downtime deadline on the source: the estimate before the stop, precopy until it fits
the limit, and the limit watched during stop-and-copy (ARCHITECTURE.md §6).

Runs in: the source coordinator, before and during a migration's stop-and-copy.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Collection
from typing import Any

from devstate.config.params import Overrun
from devstate.config.spec import Backend
from devstate.errors import DowntimeLimitUnmet, DowntimeOverrun, MigrationFailed
from devstate.migration.dirty import RamPrecopy
from devstate.migration.machine import Machine, OnMachine
from devstate.planning.admission import TransferOrder
from devstate.planning.cost import Estimate, HostCosts, estimate
from devstate.worker import jobs as m

# Records per worker the cost model's probe gets and puts back: enough for a stable mean,
# few enough to fit the record slots and take milliseconds.
PROBE_RECORDS = 64
# Auto-converge throttles a guest whose rounds past the first this many did not converge
# (QEMU: two syncs in a row whose dirtied bytes passed half of those sent).
AUTO_CONVERGE_AFTER = 2
# How often precopy looks at what is left to send, against the limit.
CONVERGE_POLL_S = 0.05
# A live guest's RAM precopy without a limit converges once what RAM adds to the expected
# downtime is within QEMU's default downtime-limit (a guest that dirties its working set
# anew every round never gets each range down to one chunk).
QEMU_DOWNTIME_LIMIT_MS = 300.0


class Deadline(OnMachine):
    """The cost model applied to ``machine``, and the downtime limit kept."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self._record_us: tuple[float, float] | None = None  # probed kvm record costs

    def transfer_order(self, costs: HostCosts) -> TransferOrder:
        """The plan's transfer order, each stream at its slower rate, within what the host
        copies (or the link carries, when capped)."""
        table = self.table
        streams = tuple((i, float(v.rate))
                        for i in self.plan.transfer if (v := table[i].stream) is not None)
        return TransferOrder(streams, min(costs.copy_bytes_per_s, self._stop_copy_cap()),
                             frozenset(d.index for d in table if d.ram is not None))

    def _stop_copy_cap(self) -> float:
        """What the bandwidth limit lets stop-and-copy send per second (inf: no cap)."""
        limit = self.params.bandwidth_limit
        return limit if limit is not None and self.params.cap_stop_copy else math.inf

    async def estimate(self, costs: HostCosts, remaining: dict[int, int] | None = None,
                       unsent: dict[int, int] | None = None) -> Estimate:
        """The expected downtime, with record costs probed on the workers (once) where the
        spec cannot know them (real KVM vCPUs), and for precopy devices the bytes they still
        have to send (``remaining``; of a RAM range's, ``unsent`` never sent before). Runs
        before the stop, the VM still running."""
        if self._record_us is None and self.machine.spec.vcpus.backend is Backend.KVM \
                and self.machine.spec.vcpus.count:
            self._record_us = await self.probe_records()
        # Under the bandwidth cap as it is now (a controller may change it meanwhile).
        return estimate(self.table, self.plan, costs.capped(self.params), self._record_us,
                        remaining, unsent, sequential=not self.params.concurrent)

    async def probe_records(self, sample: int = PROBE_RECORDS) -> tuple[float, float]:
        """Get up to ``sample`` record devices per worker into the arena and put them back,
        on every worker at once; return one record's (get, put) in µs of a core, as the
        cost model counts them. The state is unchanged: each record is put back exactly as
        it was got."""
        gets = await self.pool.call_all({w: m.SnapshotRecords(sample)
                                         for w in range(self.plan.workers)})
        puts = await self.pool.call_all({w: m.RestoreRecords()
                                         for w in range(self.plan.workers)})
        per_get = [ns / n for ns, n in gets.values() if n]
        per_put = [puts[w] / gets[w][1] for w in gets if gets[w][1]]
        if not per_get:
            return 0.0, 0.0
        # Measured with every worker busy at once: a record's wall time on one worker,
        # scaled to core time when workers share fewer cores.
        share = min(1.0, len(os.sched_getaffinity(0)) / self.plan.workers)
        return (sum(per_get) / len(per_get) / 1e3 * share,
                sum(per_put) / len(per_put) / 1e3 * share)

    async def within_limit(self, work: Awaitable[object], t0: int, made: Estimate) -> None:
        """Await stop-and-copy; with ``Overrun.ABORT``, cancel it once the limit passes."""
        limit = self.params.downtime_limit_ms
        if limit is None or self.params.overrun is not Overrun.ABORT:
            await work
            return
        left_s = limit / 1e3 - (time.monotonic_ns() - t0) / 1e9
        try:
            async with asyncio.timeout(max(0.0, left_s)):
                await work
        except TimeoutError:
            raise DowntimeOverrun(f"stop-and-copy passed the downtime limit of {limit:.0f} ms "
                                  f"(expected {made.expected_ms:.0f} ms; critical path: "
                                  f"{made.explain()}): aborted, the source resumed with its "
                                  "state unchanged") from None

    async def _converged_unlimited(self, costs: HostCosts, remaining: dict[int, int],
                                   made: Estimate, ram: RamPrecopy | None) -> bool:
        """Without a limit: every VFIO device in precopy is down to one chunk, and what a
        live guest's RAM still adds to the stop-and-copy is within QEMU's default limit
        (the rest of the estimate, vCPUs and stopped devices, precopy cannot lower)."""
        ranges = set(ram.ranges) if ram is not None else set()
        if any(n > self.params.chunk_bytes for i, n in remaining.items() if i not in ranges):
            return False
        if not ranges:
            return True
        floor = await self.estimate(costs, {**remaining, **dict.fromkeys(ranges, 0)})
        return made.expected_ms - floor.expected_ms <= QEMU_DOWNTIME_LIMIT_MS

    async def converge(self, saving: asyncio.Future[Any], costs: HostCosts,
                       streaming: Collection[int], ram: RamPrecopy | None = None) -> Estimate:
        """Precopy until the expected downtime meets the limit (without one: see
        :meth:`_converged_unlimited`); return the estimate to switch over on.
        With ``ram`` (a live guest's RAM in precopy), each look starts a new round once
        every range has sent its last (:meth:`RamPrecopy.advance`): what the guest dirtied
        meanwhile is what stop-and-copy would send.

        Past ``params.precopy_timeout_s`` it switches over anyway if the policy says so
        (``force_switchover``, or no limit), else raises :class:`DowntimeLimitUnmet`;
        with ``params.wait_for_limit`` it goes on until the limit (as it is then) is met.
        """
        started = time.monotonic()
        left: dict[int, int] = {}  # what the stop would move, as last known
        while True:
            limit = self.params.downtime_limit_ms  # a controller may change it meanwhile
            if saving.done():
                saving.result()  # a failed precopy: its error
                raise MigrationFailed("the save ended before the switchover")
            replies = await self.pool.call_all({w: m.PrecopyRemaining()
                                                for w in range(self.plan.workers)})
            # A device whose precopy has not begun yet has all of its state to send.
            remaining = {i: self.table[i].size for i in streaming}
            remaining.update({i: n for reply in replies.values() for i, n in reply.items()})
            synced = await ram.advance(remaining) if ram is not None else remaining
            left = synced if synced is not None else left or remaining
            made = await self.estimate(costs, left, ram.unsent if ram is not None else None)
            converged = synced is not None and (
                made.expected_ms <= limit if limit is not None
                else await self._converged_unlimited(costs, synced, made, ram))
            if converged:
                return made
            if synced is not None and ram is not None and self.params.auto_converge \
                    and ram.rounds > AUTO_CONVERGE_AFTER:
                await ram.throttle_more()
            waited = time.monotonic() - started
            if waited >= self.params.precopy_timeout_s and not self.params.wait_for_limit:
                if limit is None or self.params.force_switchover:
                    return made
                raise DowntimeLimitUnmet(limit, made.expected_ms, f"{made.explain()} (after "
                                         f"{waited:.1f} s of precopy, still "
                                         f"{sum(left.values()) / 2**20:.0f} MiB to send)")
            await asyncio.wait({saving}, timeout=CONVERGE_POLL_S)
