"""A source and a destination on this machine, started once and migrated back and forth.

Starting a side costs a pool of worker processes (and, for a local migration, a destination
process): most of a short test's time. A :class:`Pair` holds two machines in this process
on an event loop of its own, so a test module whose tests only migrate and read the report
can share one warm pair (the ``warm_pair`` fixture in conftest.py). Each :meth:`migrate`
is a full, verified migration over a Unix socket; the machine that received the VM sends
it the next time, as two VMMs passing a VM between them would.

The pair's parameters are fixed where they shape the pools (workers, arena); those that
only steer a migration (routing, channels, limits, precopy) can change between migrations
with :meth:`tune`, on both sides at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from devstate.config.params import MigrationParams
from devstate.config.spec import MachineConfig
from devstate.lifecycle import background
from devstate.migration.destination import Incoming
from devstate.migration.machine import Machine
from devstate.migration.source import Outgoing
from devstate.net.channels import Listener, parse_uri
from devstate.report.migration import MigrationReport

T = TypeVar("T")


class Pair:
    """Two machines of ``spec`` in this process: one runs the VM, the other waits for it."""

    def __init__(self, spec: MachineConfig, params: MigrationParams | None = None) -> None:
        self.spec = spec
        self.loop = uvloop.new_event_loop()
        params = params or MigrationParams()
        self._machines = (Machine(spec, params, side="a"),
                          Machine(spec, params, incoming=True, side="b"))
        # One Outgoing per machine: each keeps what its estimates probed across migrations.
        self._outgoing = tuple(Outgoing(m) for m in self._machines)
        self._running = 0  # the machine that runs the VM now
        self._tmp = tempfile.TemporaryDirectory(prefix="devstate-pair-")
        self.migrations = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the pair's loop (the one its pools live on)."""
        return self.loop.run_until_complete(coro)

    def start(self) -> Pair:
        """Start both machines' pools."""
        self.run(_each(m.start() for m in self._machines))
        return self

    @property
    def source(self) -> Machine:
        """The machine that runs the VM now, and sends it next."""
        return self._machines[self._running]

    @property
    def destination(self) -> Machine:
        """The machine that receives the VM next."""
        return self._machines[1 - self._running]

    @property
    def outgoing(self) -> Outgoing:
        """The source's side of the next migration (its estimates, its last report)."""
        return self._outgoing[self._running]

    def tune(self, **changes: Any) -> None:
        """Change parameters that steer a migration, on both machines."""
        for machine in self._machines:
            machine.params = dataclasses.replace(machine.params, **changes)

    def migrate(self, **kwargs: Any) -> MigrationReport:
        """Migrate the VM to the other machine, digests compared; the roles swap after."""
        report = self.run(self._migrate(**kwargs))
        self._running = 1 - self._running
        self.migrations += 1
        return report

    async def _migrate(self, **kwargs: Any) -> MigrationReport:
        path = Path(self._tmp.name) / f"m{self.migrations}.sock"
        listener = Listener(parse_uri(f"unix:{path}"))
        listener.open()
        try:
            async with background(Incoming(self.destination).accept_migration(listener)) \
                    as (accepting,):
                report = await self.outgoing.migrate(listener.address, compare_digests=True,
                                                     **kwargs)
                result = await accepting
        finally:
            listener.close()
        assert result.completed, result.reason
        return report

    def close(self) -> None:
        """Stop both pools and the loop."""
        try:
            self.run(_each(m.close() for m in self._machines))
        finally:
            self.loop.close()
            self._tmp.cleanup()


async def _each(steps: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run ``steps`` at once, on the running loop (a gather made outside it would bind the
    thread's default loop instead)."""
    await asyncio.gather(*steps)
