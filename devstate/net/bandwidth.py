"""A bandwidth limit (QEMU's ``max-bandwidth``): pacing of the bytes a channel sends.

Runs in: a source worker, on its event loop, one :class:`Pacer` per data channel. The
migration's limit is shared across its channels: each channel gets ``limit / channels``
(see :meth:`Pacer.for_channel`), so the total never exceeds the limit. A channel whose
share goes unused does not lend it to the others; that costs throughput only when the
channels carry unequal loads (affinity routing of unequal devices), and keeps the workers
free of any shared state on the hot path.
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
