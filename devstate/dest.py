"""The destination side: a machine whose devices wait, blank, for an incoming migration.

Runs in: the destination coordinator process (``devstate vm --incoming``), on uvloop.

Sequence (main channel messages in capitals; see source.py for the other side)::

    accept main channel; its hello, then HELLO: the device table must equal ours, the
        channel count our worker count, the owner map our plan's
    accept one data channel per worker (hello: migration id, index); pass each fd to its
        worker; connections with another migration id, a duplicate index, or no hello are
        refused and logged, and the migration goes on
    every stream device opens its load session (VFIO STOP -> RESUMING); Load dispatched
    READY ->
    ... workers receive into the arena, put, verify each END digest ...
    LOADED -> (how many devices were loaded and verified)
    <- COMMIT: resume every device; t1; RESUMED(t1) ->
    REPORT -> (per-device results, and digests if asked: off the critical path)
    <- ABORT, a closed main channel, or any failure before COMMIT: every device discards
       its load (FAILED -> with the reason, if the source is still there)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from devstate import channels, wire
from devstate import messages as m
from devstate.errors import ChannelError, DevstateError, ProtocolError, describe
from devstate.lifecycle import no_gc_pauses
from devstate.machine import Machine

log = logging.getLogger("devstate.dest")

# The source connects its data channels right after HELLO; seconds are generous.
CHANNELS_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class IncomingResult:
    """How an incoming migration ended on the destination."""

    completed: bool
    reason: str = ""


class IncomingVM(Machine):
    """The destination machine: a worker pool whose workers own blank devices."""

    incoming = True
    side = "dest"

    async def accept_migration(self, listener: channels.Listener) -> IncomingResult:
        """Take one incoming migration from ``listener`` to completion or failure."""
        main = await listener.accept()
        try:
            hello = await channels.read_hello(main)
            if hello.kind is not wire.ChannelKind.MAIN:
                raise ProtocolError("hello.kind", "the first connection must be the main channel")
            body = await channels.expect_control(main, wire.ControlType.HELLO)
            concurrent, send_digests = self._check_hello(body, hello)
            await self._adopt_channels(listener, hello.migration_id)
            await self.pool.call_all({w: m.PrepareLoad(self.plan.devices_of(w))
                                      for w in range(self.plan.workers)})
            with no_gc_pauses():  # the source has stopped: until t1, no collection pauses
                loaded = await self._load(main, concurrent)
                await channels.send_control(main, wire.ControlType.LOADED, {"devices": loaded})
                await channels.expect_control(main, wire.ControlType.COMMIT)
        except BaseException as exc:
            await self._discard(main, exc)
            main.close()
            if isinstance(exc, DevstateError | OSError):
                return IncomingResult(False, describe(exc))
            raise
        try:
            with no_gc_pauses():
                await self.pool.call_all({w: m.Resume() for w in range(self.plan.workers)})
                t1 = time.monotonic_ns()
        except DevstateError as exc:
            # Committed, but not running: neither side runs the VM; say so, loudly.
            main.close()
            return IncomingResult(False, f"resume after commit failed: {describe(exc)}")
        self.running = True
        try:
            await channels.send_control(main, wire.ControlType.RESUMED, {"t1_ns": t1})
            # Off the critical path now: what each device cost, and its digest if asked.
            results = m.unpack_results(await self.pool.call_all(
                {w: m.Results() for w in range(self.plan.workers)}))
            await channels.send_control(main, wire.ControlType.REPORT, {
                "devices": _result_rows(results),
                "digests": await self.digests() if send_digests else {}})
        except (DevstateError, OSError) as exc:
            # Running here, and the source has committed: a report that cannot be sent
            # changes nothing; say why.
            log.warning("after resume: %s", exc)
        finally:
            main.close()
        return IncomingResult(True)

    def _check_hello(self, body: dict[str, Any], hello: wire.Hello) -> tuple[bool, bool]:
        wire.field(body, "migration_id", str)
        theirs = wire.field(body, "devices", list)
        ours = self.spec.handshake_table()
        if theirs != ours:
            raise ProtocolError("control.devices", _table_difference(theirs, ours))
        n = wire.field(body, "channels", int)
        if n != self.plan.workers or hello.channels != n:
            raise ProtocolError("control.channels", f"source has {n} data channels, "
                                                    f"destination {self.plan.workers} workers")
        chunk = wire.field(body, "chunk_bytes", int)
        if chunk > self.settings.chunk_bytes:
            raise ProtocolError("control.chunk_bytes", f"source packets of {chunk} B exceed "
                                f"the destination's slots of {self.settings.chunk_bytes} B")
        if wire.field(body, "owners", list) != list(self.plan.owner):
            raise ProtocolError("control.owners", "source and destination plans differ")
        return wire.field(body, "concurrent", bool), wire.field(body, "digests", bool)

    async def _adopt_channels(self, listener: channels.Listener,
                              migration_id: uuid.UUID) -> None:
        """Accept one data channel per worker; refuse and log anything else."""
        adopted: set[int] = set()
        async with asyncio.timeout(CHANNELS_TIMEOUT_S):
            while len(adopted) < self.plan.workers:
                conn = await listener.accept()
                try:
                    hello = await channels.read_hello(conn)
                    refusal = _refusal(hello, migration_id, adopted, self.plan.workers)
                    if refusal:
                        log.warning("refused a data channel: %s", refusal)
                        continue
                    await self.pool.call(hello.index, m.AdoptChannel(hello.index),
                                         fd=conn.fileno())
                    adopted.add(hello.index)
                except (ChannelError, ProtocolError) as exc:
                    log.warning("refused a connection: %s", exc)
                finally:
                    conn.close()  # the worker holds its own duplicate of an adopted fd

    async def _load(self, main: socket.socket, concurrent: bool) -> int:
        """Send READY and load; the source aborting or vanishing ends the load.

        Returns how many devices were loaded and verified.
        """
        loading = asyncio.ensure_future(self.pool.call_all({
            w: m.Load(self.plan.devices_of(w), concurrent, self.settings.record_threads)
            for w in range(self.plan.workers)}))
        await channels.send_control(main, wire.ControlType.READY, {})
        watching = asyncio.ensure_future(channels.recv_control(main))
        try:
            done, _ = await asyncio.wait({loading, watching},
                                         return_when=asyncio.FIRST_COMPLETED)
            if watching in done:
                kind, body = watching.result()
                raise ChannelError(f"source sent {kind.name} during the load: "
                                   f"{body.get('reason', '')}")
            results = loading.result()
        finally:
            for task in (loading, watching):
                task.cancel()
            await asyncio.gather(loading, watching, return_exceptions=True)
        return sum(results.values())

    async def _discard(self, main: socket.socket, cause: BaseException) -> None:
        log.warning("incoming migration failed: %s", describe(cause))
        with contextlib.suppress(Exception):
            await channels.send_control(main, wire.ControlType.FAILED, {"reason": describe(cause)})
        alive = [w for w in range(self.plan.workers) if w not in self.pool.lost()]
        with contextlib.suppress(DevstateError):
            await self.pool.call_all({w: m.Cancel() for w in alive})
        with contextlib.suppress(DevstateError):
            await self.pool.call_all({w: m.Discard() for w in alive})


def _result_rows(results: list[m.DeviceResult]) -> list[dict[str, Any]]:
    return [{"id": r.id, "index": r.index, "bytes": r.bytes, "worker": r.worker,
             "start_ns": r.start_ns, "done_ns": r.done_ns}
            for r in results]


def _refusal(hello: wire.Hello, migration_id: uuid.UUID, adopted: set[int],
             workers: int) -> str:
    if hello.kind is not wire.ChannelKind.DATA:
        return "a second main channel"
    if hello.migration_id != migration_id:
        return f"migration id {hello.migration_id} is not {migration_id}"
    if hello.channels != workers:
        return f"it counts {hello.channels} channels, not {workers}"
    if hello.index in adopted:
        return f"channel {hello.index} is already connected"
    return ""


def _table_difference(theirs: list[Any], ours: list[Any]) -> str:
    if len(theirs) != len(ours):
        return f"source has {len(theirs)} devices, destination {len(ours)}"
    for i, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        if a != b:
            return f"device {i}: source has {a}, destination has {b}"
    return "device tables differ"
