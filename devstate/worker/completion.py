"""Completion order on the destination: a device completes its load only after the devices
it loads after (spec ``after``, e.g. the interrupt controller before the vCPUs), wherever
those are loaded.

Runs in: a destination worker, inside one Load. A device that others wait for announces
its load to the other workers (a LOADED note through the mesh), so the order holds across
workers without the coordinator in the loop.
"""

from __future__ import annotations

import asyncio

from devstate.worker.handoff import Mesh, Op


class CompletionOrder:
    """Which devices are loaded, and who waits for which (one Load's worth)."""

    def __init__(self, after: tuple[tuple[int, ...], ...], mesh: Mesh | None) -> None:
        self._after = after
        self._mesh = mesh
        # Who loads after each device, and how many of its own a device still waits for:
        # ready() is asked once per record, 1024 times per Load, in the downtime.
        self._dependents: list[list[int]] = [[] for _ in after]
        for index, deps in enumerate(after):
            for dep in deps:
                self._dependents[dep].append(index)
        self._unmet = [len(deps) for deps in after]
        self._loaded: set[int] = set()
        self._waiting: dict[int, list[asyncio.Future[None]]] = {}

    def loaded_here(self, index: int) -> None:
        """Device ``index``, owned by this worker, is loaded: wake its waiters here and
        tell the other workers, if anyone loads after it."""
        if self._dependents[index]:
            self.loaded(index)
            if self._mesh is not None:
                for peer in self._mesh.peers:
                    self._mesh.send(peer, Op.LOADED, device=index)

    def loaded(self, index: int) -> None:
        """Device ``index`` is loaded (here, or on the worker whose note said so)."""
        if index in self._loaded:
            return
        self._loaded.add(index)
        for dependent in self._dependents[index]:
            self._unmet[dependent] -= 1
        for waiter in self._waiting.pop(index, []):
            if not waiter.done():
                waiter.set_result(None)

    def ready(self, index: int) -> bool:
        """Whether every device ``index`` loads after is loaded already."""
        return not self._unmet[index]

    async def wait(self, index: int) -> None:
        """Until every device ``index`` loads after is loaded, here or on another worker."""
        for dep in self._after[index]:
            if dep not in self._loaded:
                waiter = asyncio.get_running_loop().create_future()
                self._waiting.setdefault(dep, []).append(waiter)
                await waiter
