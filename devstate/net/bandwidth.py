"""A bandwidth limit (QEMU's ``max-bandwidth``): pacing of the bytes a channel sends.

Runs in: a source worker, on its event loop, one :class:`Pacer` per data channel. The
migration's limit is a total over its channels, split evenly: each channel gets
``limit / channels`` (see :meth:`Pacer.for_channel`), so the total never exceeds the limit.

Why the split stays even, although a channel whose share goes unused does not lend it to
the others: the channels are sent by different worker *processes* (channel ``k`` by source
worker ``k % S``), each on its own event loop, with nothing shared on the hot path but the
arena. A work-conserving total would need a token bucket in shared memory that every
packet's send takes a cross-process lock on, handed to every worker with its Save job.
What the split costs is known exactly and counted instead: with affinity routing a stream
rides one channel and so moves at ``limit / channels`` at most, and the cost model
estimates it so (:class:`devstate.planning.cost.Link`); ``--routing spread`` puts a
stream's packets on every channel, so one large device gets the whole limit.
"""

from __future__ import annotations

import asyncio
import time

# Bytes a channel may send at once before pacing starts: a burst of at least one 1 MiB
# chunk, or 10 ms of its rate, so pacing does not cut packets into tiny sends.
MIN_BURST_BYTES = 1 << 20
BURST_S = 0.01


class Pacer:
    """Paces a byte stream to ``rate`` bytes per second (a token bucket)."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("a bandwidth limit must be positive")
        self.rate = rate
        self._burst_s = max(BURST_S, MIN_BURST_BYTES / rate)
        self._free_at = time.monotonic()  # when the bucket is full again

    @classmethod
    def for_channel(cls, limit: float | None, channels: int) -> Pacer | None:
        """The pacer of one of ``channels`` channels sharing ``limit`` (None: unlimited)."""
        return None if limit is None else cls(limit / channels)

    async def spend(self, nbytes: int) -> None:
        """Account for ``nbytes`` just sent; sleep if the channel is ahead of its rate."""
        now = time.monotonic()
        self._free_at = max(self._free_at, now) + nbytes / self.rate
        ahead = self._free_at - now - self._burst_s
        if ahead > 0:
            await asyncio.sleep(ahead)
