"""The VM owner's threads: where a worker runs its batched vCPU gets and puts.

Each call of a :class:`~devstate.devices.base.RecordBatch` drops the GIL for a whole batch,
so threads run the KVM ioctls truly at once, as many as there are cores to run them: the
threads are pinned one per CPU of the side (as the physical-limit probe pins them,
shared/tools/kvm-limit), not left on the one CPU the worker process itself is pinned to.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from devstate.devices.base import RecordDevice
from devstate.worker.wakeup import prefer_wakeups

if TYPE_CHECKING:
    from devstate.worker.holdings import Holdings

T = TypeVar("T")

# Batched records per batch and owner thread. The source's threads get one batch while the
# loop ships the one before (so the destination starts putting at once); the destination
# puts whatever has arrived, up to this many per thread in one call. A batch travels as one
# RECORDS packet (64 vCPUs: ~440 KB, within a 1 MiB chunk slot). Measured with 288 vCPUs on
# 2 cores, interleaved, 24 migrations each: 64 against 16 cut the median downtime 4-9%
# (less Python per record on both sides); 128 was no better, 8 was worse.
RECORD_BATCH = 64
# A source lane's first batch is smaller, so that the destination starts putting sooner
# (measured: ~10% less downtime for 288 vCPUs on 2 cores).
FIRST_BATCH = 4


class OwnerThreads:
    """``count`` threads, the i-th started pinned to ``cpus[i % len(cpus)]`` (none pinned
    if ``cpus`` is empty)."""

    def __init__(self, cpus: Sequence[int], count: int) -> None:
        self.cpus = tuple(cpus)
        self.count = count
        self._started = itertools.count()  # next() is atomic under the GIL
        self.executor = ThreadPoolExecutor(count, thread_name_prefix="vcpu",
                                           initializer=self._pin)
        # Start (and pin) every thread now, not on the first batch of a stop-and-copy:
        # each task waits for all the others, so no thread can take two.
        barrier = threading.Barrier(count)
        waits = [self.executor.submit(barrier.wait) for _ in range(count)]
        self.started = waits[-1]  # done once every thread runs (and was pinned)

    def _pin(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, {self.cpus[next(self._started) % len(self.cpus)]})
        prefer_wakeups()

    def fits(self, cpus: Sequence[int], count: int) -> bool:
        """Whether these threads are the ones a job asks for."""
        return self.cpus == tuple(cpus) and self.count == count

    def shutdown(self) -> None:
        """Wait for the threads to finish what they run, and end them."""
        self.executor.shutdown()


async def finish_on_thread(executor: Executor | None, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on ``executor`` and return its result; if cancelled meanwhile,
    wait for the thread to finish before re-raising: it writes into arena slots, which must
    not be reused (or unmapped) while it runs."""
    running = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait({running})
        raise


def batched_records(held: Holdings) -> frozenset[int]:
    """The indices of the records ``held`` gets or puts through its batch (none without
    one): worked out once per Save or Load, not per record on the critical path."""
    if held.batch is None or held.executor is None:
        return frozenset()
    return frozenset(i for i, d in held.devices.items()
                     if isinstance(d, RecordDevice) and d.batch is not None)
