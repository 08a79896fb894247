"""The VM owner's threads (devstate.worker.threads): started and pinned before the stop,
and never outlived by the slots they write into."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from devstate.worker.threads import OwnerThreads, finish_on_thread

CPUS = tuple(sorted(os.sched_getaffinity(0)))


def test_every_thread_is_started_and_pinned_to_one_cpu_of_the_side() -> None:
    threads = OwnerThreads(CPUS, len(CPUS))
    try:
        threads.started.result(timeout=10)  # all of them run before any batch is given
        # As many tasks as threads, each holding its thread until all are in: one per thread.
        everyone = threading.Barrier(len(CPUS))

        def where() -> frozenset[int]:
            everyone.wait(timeout=10)
            return frozenset(os.sched_getaffinity(0))

        seen = [f.result() for f in [threads.executor.submit(where) for _ in CPUS]]
        assert sorted(seen, key=min) == [frozenset({c}) for c in CPUS]
        assert threads.fits(CPUS, len(CPUS)) and not threads.fits(CPUS[:1], len(CPUS))
    finally:
        threads.shutdown()


def test_a_cancelled_wait_still_waits_for_the_thread_to_finish() -> None:
    threads = OwnerThreads((), 1)
    finished: list[float] = []

    def slow() -> None:
        time.sleep(0.2)
        finished.append(time.monotonic())

    async def scenario() -> float:
        task = asyncio.create_task(finish_on_thread(threads.executor, slow))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    try:
        returned = asyncio.run(scenario())
        # The cancelled caller got control back only after the thread's work ended: a
        # thread writing into an arena slot never outlives the save that lent it.
        assert finished and finished[0] <= returned
    finally:
        threads.shutdown()
