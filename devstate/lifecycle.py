"""Lifecycles: ``async with`` owns what starts and must close; no GC pause in critical work."""

from __future__ import annotations

import abc
import contextlib
import gc
from collections.abc import Iterator
from typing import Self


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
