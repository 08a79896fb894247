"""Lifecycles: ``async with`` owns what starts and must close; no GC pause in critical work."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import gc
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, Self


class AsyncLifecycle(abc.ABC):
    """``async with x`` starts ``x``, and closes it on every exit, a failed start included.

    ``close`` must be idempotent and safe on something never or only partly started: the
    seed thread's crash came from tearing down a thread that was never created.
    """

    @abc.abstractmethod
    async def start(self) -> None:
        """Acquire everything; on failure, leave what was acquired for ``close``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything. Idempotent."""

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@contextlib.asynccontextmanager
async def background(*work: Awaitable[Any]) -> AsyncIterator[tuple[asyncio.Future[Any], ...]]:
    """Run ``work`` as tasks while the body runs; on every exit, cancel what has not
    finished and wait for it, so that nothing outlives the block (trio's nursery rule).

    The body awaits, races (``asyncio.wait``) or ignores the tasks as it needs; their
    exceptions after the block are swallowed with them: a caller that cares awaited them.
    """
    tasks = tuple(asyncio.ensure_future(w) for w in work)
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def no_gc_pauses() -> Iterator[None]:
    """Keep the cyclic garbage collector from pausing this process inside the block.

    Stop-and-copy runs with the VM stopped: a collection walking a large heap costs
    milliseconds at a random point (profiles showed it as costly as the socket copies).
    Objects made inside are collected when the block ends. Nests safely.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_PR_SET_PDEATHSIG = 1


def end_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies, however it dies.

    For helper processes that only make sense while their parent lives (a device model
    and its worker, a one-shot destination and the migration that started it). Exits at
    once if the parent is already gone (it died before the prctl: no signal would come).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:
        raise SystemExit(0)
