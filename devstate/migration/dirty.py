"""A live guest's RAM in precopy, as the source coordinator drives it: KVM's dirty log on,
rounds of dirty pages through the pool, and what they came to.

Runs in: the source coordinator, during a migration's precopy (the guest running).

A round is every page the dirty log held when it began (the first round: every page).
The RAM ranges send their round's pages from whichever workers own them; once every range
has sent its round, the coordinator has the VM's owner sync KVM's log into the shared log
(:mod:`devstate.devices.kvm.dirty`): the pages the guest dirtied during the round are the
next round's. Each sync says how many pages each range now holds, which is what
stop-and-copy would have to send if the switchover came now, and how many of them were
never sent (holes on the destination, which the stop's writes fault in): the estimate
weighs both with the vCPUs and VFIO state
(:meth:`devstate.migration.deadline.Deadline.converge`). At the stop the owner syncs once
more (the last round, sent with the guest stopped).

The two sides of the shared log never meet: the owner writes it only in a sync, which the
coordinator asks for after every range answered for its round; a range takes its part only
when the coordinator asks what is left (PrecopyRemaining) or when its stop-and-copy begins,
after the stop's sync.
"""

from __future__ import annotations

import contextlib
import time

from devstate.devices.kvm.ram import PAGE_BYTES
from devstate.errors import DevstateError
from devstate.migration.machine import VM_OWNER, Machine, OnMachine
from devstate.report.migration import DeviceResult
from devstate.report.ram import RamReport
from devstate.worker import jobs as m

# QEMU's cpu-throttle-initial and cpu-throttle-increment defaults; its maximum is 99 %.
THROTTLE_INITIAL, THROTTLE_INCREMENT, THROTTLE_MAX = 20, 10, 99


class RamPrecopy(OnMachine):
    """The RAM ranges of ``machine`` in precopy: rounds, syncs and rates."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self.ranges = tuple(d.index for d in self.table if d.ram is not None)
        self.total = sum(self.table[i].size for i in self.ranges)
        self.on = False
        self._started = self._synced = self._stopped = 0.0
        self._round_starts: list[float] = []  # monotonic s, each round's
        self.rounds = self.syncs = 0
        self._queued = 0      # page bytes handed to the ranges so far (every round's)
        self.remaining = 0    # page bytes the ranges have yet to send, at the last look
        self.unsent: dict[int, int] = {}  # of each range's at the last sync, bytes never sent
        self.dirty_rate = 0.0  # pages/s the guest dirtied over the last round
        self.throttle_pct = 0  # auto-converge: the share of time the guest is kept stopped

    async def start(self) -> None:
        """Have the owner log the guest's writes from now: round 1 is every page."""
        await self.pool.call(VM_OWNER, m.LogDirty(True))
        self.on = True
        self._started = self._synced = time.monotonic()
        self._round_starts = [self._started]
        self._stopped = 0.0
        # QEMU counts the sync that starts its bitmap too: so does dirty_sync_count.
        self.rounds = self.syncs = 1
        self._queued = self.remaining = self.total
        self.unsent = {}
        self.dirty_rate = 0.0
        self.throttle_pct = 0

    async def advance(self, remaining: dict[int, int]) -> dict[int, int] | None:
        """``remaining`` (bytes each precopy device has left, by index) as stop-and-copy
        would find it, once every range has sent its round: the owner syncs the log and the
        ranges' bytes are what the guest dirtied during the round (the next round's).
        None while a round is still being sent: what the guest dirtied meanwhile is not
        known until the sync, so no switchover may be decided on it (QEMU decides at the
        end of an iteration too)."""
        left = sum(remaining.get(i, self.table[i].size) for i in self.ranges)
        self.remaining = left
        if left or not self.on:
            return None
        counts: tuple[tuple[int, int], ...] = await self.pool.call(VM_OWNER, m.SyncDirty())
        now = time.monotonic()
        pages = sum(dirty for dirty, _ in counts)
        self.dirty_rate = pages / max(now - self._synced, 1e-6)
        self._synced = now
        self._round_starts.append(now)
        self.rounds += 1
        self.syncs += 1
        self._queued += pages * PAGE_BYTES
        self.remaining = pages * PAGE_BYTES
        self.unsent = {i: unsent * PAGE_BYTES
                       for i, (_, unsent) in zip(self.ranges, counts, strict=True)}
        return {**remaining, **{i: dirty * PAGE_BYTES
                                for i, (dirty, _) in zip(self.ranges, counts, strict=True)}}

    async def throttle_more(self) -> None:
        """Auto-converge, after a round that did not converge: keep the guest stopped a
        larger share of the time, as QEMU's cpu-throttle does (20 %, then 10 % more each
        time, to 99 %)."""
        if self.on and self.throttle_pct < THROTTLE_MAX:
            step = THROTTLE_INITIAL if not self.throttle_pct else THROTTLE_INCREMENT
            self.throttle_pct = min(THROTTLE_MAX, self.throttle_pct + step)
            await self.pool.call(VM_OWNER, m.ThrottleGuest(self.throttle_pct))

    def stopped(self, t0: int) -> None:
        """The guest stopped at ``t0`` (monotonic ns; its owner synced the last round)."""
        if self.on:
            self.syncs += 1
            self._stopped = t0 / 1e9

    async def stop(self) -> None:
        """Stop the owner's logging (a source that runs on writes at full speed again).
        Idempotent; a lost owner took its VM and log with it."""
        if self.on:
            self.on = False
            with contextlib.suppress(DevstateError):
                await self.pool.call(VM_OWNER, m.LogDirty(False))

    def progress(self) -> RamReport:
        """The precopy so far: pages sent are those handed out less those left."""
        return self._report(self._queued - self.remaining, self.remaining, 0)

    def report(self, saved: list[DeviceResult]) -> RamReport:
        """The finished move, from the ranges' results (extent bytes, headers included)."""
        ranges = [r for r in saved if r.index in self.ranges]
        sent = sum(r.bytes for r in ranges)
        return self._report(sent, 0, sent - sum(r.precopy_bytes for r in ranges))

    def _report(self, sent: int, remaining: int, stopped: int) -> RamReport:
        ran = (self._stopped or time.monotonic()) - self._started
        precopied = sent - stopped
        since_stop = tuple((t - self._stopped) * 1e3 for t in self._round_starts) \
            if self._stopped else ()
        return RamReport(self.total, sent, remaining, self.rounds, self.syncs,
                         self.dirty_rate, precopied / PAGE_BYTES / ran if ran > 0 else 0.0,
                         ran * 1e3, stopped, since_stop, self.throttle_pct)
