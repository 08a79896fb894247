"""Shared fixtures: every test must leave no child process and no arena behind."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from multiprocessing import forkserver, resource_tracker
from typing import Any

import psutil
import pytest
import uvloop

from devstate.arena.slots import PREFIX, SHM_DIR
from devstate.config.params import MigrationParams
from devstate.config.spec import parse_spec
from devstate.migration.source import SourceVM
from tests.kit import Pair


def shm_segments() -> set[str]:
    """devstate arenas in /dev/shm that this test run could have made.

    Names carry the creator's pid (``devstate-<pid>-<id>``); a segment of a live process
    outside this process tree belongs to someone else (another test run on the machine).
    """
    ours = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    names = set()
    for name in os.listdir(SHM_DIR):
        if not name.startswith(PREFIX):
            continue
        pid = int(name[len(PREFIX):].split("-", 1)[0] or 0)
        if pid in ours or not psutil.pid_exists(pid):
            names.add(name)
    return names


def live_children() -> list[psutil.Process]:
    """This process's descendants that are still running (zombies count as gone)."""
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def _ignorable(proc: psutil.Process) -> bool:
    # multiprocessing's forkserver and resource tracker live for the whole test session.
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return True
    return "forkserver" in cmd or "resource_tracker" in cmd


def our_children() -> list[psutil.Process]:
    """Live descendants, less multiprocessing's session-long helpers."""
    return [p for p in live_children() if not _ignorable(p)]


@pytest.fixture(autouse=True)
def no_leaks() -> Any:
    """Fail a test that leaves devstate processes or shared-memory segments behind (what
    was running before it, such as a module's warm pair, is not the test's)."""
    before = shm_segments()
    running = {p.pid for p in our_children()}
    yield
    leaked_shm = shm_segments() - before
    # Processes are reaped asynchronously by their parents: allow a bounded moment.
    _, alive = psutil.wait_procs([p for p in our_children() if p.pid not in running],
                                 timeout=5.0)
    assert not alive, f"processes left running: {[p.cmdline() for p in alive]}"
    assert not leaked_shm, f"shared-memory segments left: {leaked_shm}"


@pytest.fixture
def run() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to completion on uvloop."""
    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        return uvloop.run(coro)
    return runner


def pytest_configure(config: pytest.Config) -> None:
    # The cost model's history of this host: the suite's runs learn into a file of their
    # own (inherited by every devstate process it starts), never into the user's cache.
    import tempfile

    os.environ["DEVSTATE_COSTS"] = os.path.join(
        tempfile.mkdtemp(prefix="devstate-costs-"), "costs.json")
    # Make sure nothing left by an earlier interrupted run confuses the leak check.
    from devstate.arena.slots import sweep_stale_segments

    sweep_stale_segments()
    asyncio.set_event_loop_policy(None)


def _fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass  # the listing's own fd, closed by now
    return fds


@pytest.fixture(scope="session")
def warm_process_machinery() -> None:
    """Start what lives for the whole session before counting: multiprocessing's forkserver
    and resource tracker, and the pipe the first pool start leaves for later ones."""
    forkserver.ensure_running()
    resource_tracker.ensure_running()

    async def start_a_pool() -> None:
        async with SourceVM(parse_spec({"vcpus": {"count": 1}}), MigrationParams(workers=1)):
            pass

    uvloop.run(start_a_pool())


@pytest.fixture
def no_fd_or_thread_leaks(warm_process_machinery: None) -> Iterator[None]:
    """The test process ends with the fds and threads it started with."""
    gc.collect()
    fds, threads = _fds(), threading.active_count()
    yield
    gc.collect()
    left = {fd: what for fd, what in _fds().items() if fds.get(fd) != what}
    assert not left, f"file descriptors left open: {left}"
    assert threading.active_count() <= threads, [t.name for t in threading.enumerate()]


@pytest.fixture(scope="module")
def warm_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """A source and destination pair (tests/kit.py) shared by a module's tests: the
    module's ``PAIR_SPEC`` machine, with its ``PAIR_PARAMS`` if it has them. Every
    process it started is gone after the module."""
    pair = Pair(request.module.PAIR_SPEC, getattr(request.module, "PAIR_PARAMS", None))
    try:
        yield pair.start()
    finally:
        pair.close()
