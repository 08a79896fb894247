"""One shape for everything that starts and must be closed: ``async with`` owns it."""

from __future__ import annotations

import abc
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
