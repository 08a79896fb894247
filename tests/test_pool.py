"""The worker pool: start, pinning, dispatch, WorkerLost within a bound, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from devstate.config.params import MigrationParams, Schedule
from devstate.config.spec import parse_spec
from devstate.devices import device_table
from devstate.errors import WorkerFailed, WorkerLost
from devstate.net.route import Routes
from devstate.worker import jobs as m
from devstate.worker.layout import arena_layout
from devstate.worker.pool import WorkerPool, usable_cpus
from tests.conftest import shm_segments

SPEC = parse_spec({"vcpus": {"count": 8}})
TABLE = device_table(SPEC)


def _pool(workers: int = 2) -> WorkerPool:
    return WorkerPool(TABLE, arena_layout(MigrationParams(workers=workers), TABLE), name="test")


def test_workers_start_pinned_with_the_arena_already_unlinked(run) -> None:
    async def scenario() -> tuple[list[int], list[list[int]], set[str]]:
        async with _pool() as pool:
            affinity = [psutil.Process(pid).cpu_affinity() for pid in pool.pids]
            return pool.pids, affinity, shm_segments()

    pids, affinity, segments = run(scenario())
    cpus = usable_cpus()
    assert affinity == [[cpus[0]], [cpus[1 % len(cpus)]]]
    assert not segments  # mapped by every worker, so the name was already dropped
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_calls_return_values_and_errors_name_the_worker(run) -> None:
    async def scenario() -> None:
        async with _pool() as pool:
            await pool.call_all({w: m.OpenDevices((w, w + 2), incoming=False)
                                 for w in range(2)})
            digests = await pool.call(1, m.Digests((1, 3)))
            assert set(digests) == {1, 3}
            with pytest.raises(WorkerFailed, match="worker 0: Save: RuntimeError: worker 0 "
                                                   "has no data channel 0"):
                await pool.call(0, m.Save((0,), Schedule.CONCURRENT, Routes(2, 2), 1))
            # The worker survives its own errors.
            assert await pool.call(0, m.Digests((0,)))

    run(scenario())


def test_a_killed_worker_fails_its_pending_call_within_one_second(run) -> None:
    async def scenario() -> float:
        async with _pool() as pool:
            victim = pool.pids[1]
            os.kill(victim, signal.SIGSTOP)  # the call below cannot be answered
            call = asyncio.ensure_future(pool.call(1, m.Digests(())))
            await asyncio.sleep(0)
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(WorkerLost) as info:
                async with asyncio.timeout(5):
                    await call
            elapsed = time.monotonic() - killed
            assert info.value.worker == 1 and info.value.exitcode == -signal.SIGKILL
            with pytest.raises(WorkerLost):  # and later calls fail at once
                await pool.call(1, m.Digests(()))
            assert await pool.call(0, m.Digests(())) == {}
            return elapsed

    assert run(scenario()) < 1.0


def test_close_is_idempotent_and_safe_before_start(run) -> None:
    async def scenario() -> None:
        pool = _pool()
        await pool.close()
        await pool.close()
        started = _pool()
        await started.start()
        await started.close()
        await started.close()

    run(scenario())
