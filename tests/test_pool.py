"""The worker pool: start, pinning, dispatch, WorkerLost within a bound, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import psutil
import pytest

from devstate.config.params import MigrationParams, Schedule
from devstate.config.spec import parse_spec
from devstate.devices import device_table
from devstate.errors import WorkerFailed, WorkerLost
from devstate.net.route import Routes
from devstate.net.transport import parse_uri
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


def test_a_resume_answers_when_the_workers_devices_ran_again_and_0_without_any(run) -> None:
    """The downtime ends at the latest answer: a worker that holds no part of the VM must
    not move it (woken late, its answer once came 14 ms after the vCPUs' release)."""
    async def scenario() -> tuple[int, dict[int, int], int]:
        async with _pool() as pool:
            await pool.call(0, m.OpenDevices((0, 1), incoming=True))
            before = time.monotonic_ns()
            resumed = await pool.call_all({w: m.Resume() for w in range(2)})
            return before, resumed, time.monotonic_ns()

    before, resumed, after = run(scenario())
    assert before < resumed[0] < after  # the same host's monotonic clock
    assert resumed[1] == 0


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


def test_a_save_is_set_up_before_the_stop_and_gets_nothing_until_switchover(
        run, tmp_path) -> None:
    """Save arms (Armed replies True) and reads no state and sends no byte until SwitchOver;
    then every device is sent. An Armed after a Save that failed says False."""
    hello = b"hello-of-channel-0"

    async def scenario() -> tuple[bool, tuple[int, int], bytes, int, int, bool]:
        path = str(tmp_path / "data.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        async with _pool(workers=1) as pool:
            await pool.call(0, m.OpenDevices(tuple(range(8)), incoming=False))

            async def destination() -> socket.socket:
                conn, _ = await loop.sock_accept(listener)
                assert await loop.sock_recv(conn, len(hello)) == hello
                await loop.sock_sendall(conn, hello)  # adopted: the echo
                return conn

            accepting = asyncio.ensure_future(destination())
            await pool.call(0, m.ConnectChannels(parse_uri(f"unix:{path}"), ((0, hello),)))
            conn = await accepting
            saving = asyncio.ensure_future(
                pool.call(0, m.Save(tuple(range(8)), Schedule.CONCURRENT, Routes(1, 1), 1)))
            armed = await pool.call(0, m.Armed(1))
            progress = await pool.call(0, m.Progress())
            try:  # nothing on the channel before the stop
                async with asyncio.timeout(0.3):
                    early = await loop.sock_recv(conn, 1 << 16)
            except TimeoutError:
                early = b""
            assert not saving.done()
            await pool.call(0, m.SwitchOver())
            received = 0
            while not saving.done() or received == 0:
                chunk = await loop.sock_recv(conn, 1 << 20)
                if not chunk:
                    break
                received += len(chunk)
            saved = await saving
            conn.close()
            listener.close()
            with pytest.raises(WorkerFailed, match="no data channel"):
                await pool.call(0, m.Save((0,), Schedule.CONCURRENT, Routes(2, 2), 2))
            after_failure = await pool.call(0, m.Armed(2))
            return armed, progress, early, saved, received, after_failure

    armed, progress, early, saved, received, after_failure = run(scenario())
    assert armed is True and progress == (0, 0) and early == b""
    assert saved == 8 and received > 8 * 16  # every vCPU's record, then the channel's FIN
    assert after_failure is False
