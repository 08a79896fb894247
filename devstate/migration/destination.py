"""The destination side: a machine whose devices wait, blank, for an incoming migration.

Runs in: the destination coordinator process (``devstate vm --incoming``), on uvloop.

Sequence (main channel messages in capitals; see source.py for the other side)::

    accept main channel; its hello, then HELLO: the device table must equal ours; the
        channel count may differ from our worker count (channel k goes to worker k % D)
    accept the data channels (hello: migration id, index); pass each fd to its worker,
        which (over TLS) runs the handshake and reads the hello again inside it;
        connections with another migration id, a duplicate index, or no hello are
        refused and logged, and the migration goes on
    every stream device opens its load session (VFIO STOP -> RESUMING); Load dispatched
    READY ->
    ... workers receive into the arena, put, verify each END digest ...
    LOADED -> (how many devices were loaded and verified)
    <- COMMIT: resume every device; RESUMED ->
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from devstate.config.params import MigrationParams, Readback, Routing, Schedule
from devstate.config.spec import MachineConfig
from devstate.errors import (
    ChannelError,
    DevstateError,
    ProtocolError,
    SourceAborted,
    WorkerFailed,
    describe,
)
from devstate.lifecycle import background, no_gc_pauses
from devstate.migration import commit, liveness
from devstate.migration.clock import monotonic_clock_id
from devstate.migration.machine import Machine, OnMachine
from devstate.net import channels
from devstate.net.route import Routes
from devstate.protocol import wire
from devstate.protocol.control import MigrationHello, Ready, Report
from devstate.worker import jobs as m

log = logging.getLogger("devstate.migration.destination")
T = TypeVar("T")

# The source connects its data channels right after HELLO; seconds are generous.
CHANNELS_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class IncomingResult:
    """How an incoming migration ended on the destination."""

    completed: bool
    reason: str = ""
    aborted: bool = False  # the source ended it (ABORT), and says why where it was started
    lease: channels.Channel | None = None  # the main channel, if kept (migration.lease)


class Incoming(OnMachine):
    """Migrations into ``machine`` (blank devices, or a machine that migrated out before)."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self._ready_ns = 0  # when READY went out: the origin of the times this side reports

    async def accept_migration(self, listener: channels.Listener,
                               tls: channels.TlsConfig | None = None, *,
                               on_accepted: Callable[[], None] | None = None,
                               keep_lease: bool = False) -> IncomingResult:
        """Take one incoming migration from ``listener`` to completion or failure.

        With ``tls`` every channel runs TLS with our certificate (and requires the source's,
        if ``tls.verify_client``). ``on_accepted`` is called once the source has connected.
        With ``keep_lease`` a completed migration's main channel is returned open, as the
        destination's lease on the VM (:mod:`devstate.migration.lease`); else it closes.
        """
        # Strangers (scanners, stray clients, silent peers) are logged and dropped: only
        # the source's own main channel starts the migration.
        main, hello = await channels.accept_source(listener)
        if on_accepted is not None:
            on_accepted()
        try:
            main, said = await self._handshake(main, hello, listener, tls)
            bound = liveness.destination_bound(self.params, said.peer_timeout_s)
            async with _refusing_late_connections(listener):
                await self.machine.prepare_vcpus(said.concurrent)
                await self.pool.call_all({w: m.PrepareLoad(self.plan.devices_of(w))
                                          for w in range(self.plan.workers)})
                # A live guest's vCPU threads wake to their entry barrier now, before the
                # stop (there they touch no vCPU, so the load puts its vCPUs meanwhile):
                # the resume after the commit only releases them, and none of the
                # wake-ups falls in the downtime.
                await self.machine.arm_guest()
                with no_gc_pauses():  # the source has stopped: no collection pauses until
                    loaded = await self._load(main, said.concurrent, bound)  # the resume
                    await commit.await_commit(main, loaded, bound)
                    # A live guest's counters as they were at the stop (its RAM is here).
                    memory = self.machine.memory
                    at_stop = memory.counters() if memory is not None else None
        except BaseException as exc:
            await self._discard(main, exc)  # it parks an armed guest's threads again
            main.close()
            if isinstance(exc, DevstateError | OSError):
                return IncomingResult(False, describe(exc),
                                      aborted=isinstance(exc, SourceAborted))
            raise
        return await self._resume(main, said.digests, keep_lease, at_stop)

    async def _handshake(self, main: channels.Channel, hello: wire.Hello,
                         listener: channels.Listener, tls: channels.TlsConfig | None
                         ) -> tuple[channels.Channel, MigrationHello]:
        """After the main channel's ``hello``: its HELLO, then every data channel adopted;
        returns the (secured) main channel and the source's HELLO."""
        main = await channels.secure_accepted(main, wire.pack_hello(hello), tls)
        said = await channels.expect(main, MigrationHello)
        self._check_hello(said, hello)
        await self._unless_source_speaks(main, self._adopt_channels(
            listener, hello.migration_id, hello.channels, tls), "channel setup")
        return main, said

    async def _resume(self, main: channels.Channel, send_digests: bool,
                      keep_lease: bool, at_stop: npt.NDArray[np.uint64] | None
                      ) -> IncomingResult:
        """Committed: run the VM here, then report (off the critical path): with a live
        guest, whether it went on from its counters ``at_stop``."""
        try:
            with no_gc_pauses():
                resumed = await self.pool.call_all({w: m.Resume()
                                                    for w in range(self.plan.workers)})
        except DevstateError as exc:
            # Committed, but not running: put every device that did resume back to blank,
            # then tell the source that nothing runs here, so that it resumes its own (the
            # source still holds the whole state: it let go of nothing before RESUMED).
            failure = DevstateError(f"resume after commit failed: {describe(exc)}")
            await self._discard(main, failure, committed=True)
            main.close()
            return IncomingResult(False, f"{failure}; the source was told to resume")
        self.machine.running = True
        try:
            await commit.resumed(main)
            results = m.unpack_results(await self.pool.call_all(
                {w: m.Results() for w in range(self.plan.workers)}))
            cost = await self.machine.vcpu_cost()
            memory = self.machine.memory
            guest = None if memory is None or at_stop is None else \
                await memory.continuity(at_stop, self.machine.guest_problem)
            await channels.send(main, Report(
                [r.to_json() for r in results], self._ready_ns, self.params.to_json(),
                await self.machine.digests() if send_digests else {},
                cost.to_json() if cost else {}, guest.to_json() if guest else None,
                max(resumed.values(), default=0)))
        except (DevstateError, OSError) as exc:
            # Running here, and the source has committed: a report that cannot be sent
            # changes nothing; say why.
            log.warning("after resume: %s", exc)
        except BaseException:
            main.close()
            raise
        if keep_lease:
            return IncomingResult(True, lease=main)
        main.close()
        return IncomingResult(True)

    def _check_hello(self, said: MigrationHello, hello: wire.Hello) -> None:
        """What the source's HELLO says against this machine and its own channel hello."""
        theirs, ours = said.devices, self.machine.table.handshake()
        if theirs != ours:
            raise ProtocolError("control.devices", _table_difference(theirs, ours))
        n = said.channels
        if hello.channels != n:
            raise ProtocolError("control.channels", f"HELLO says {n} data channels, the "
                                                    f"main channel's hello {hello.channels}")
        most = self.plan.workers * self.params.window_slots
        if n > most:
            raise ProtocolError("control.channels", f"source has {n} data channels, this "
                                f"destination takes at most {most} ({self.plan.workers} "
                                f"workers x {self.params.window_slots} receive windows)")
        share = self.params.chunk_slots // -(-n // self.plan.workers)
        if share < 1:
            raise ProtocolError("control.channels", f"{n} data channels over "
                                f"{self.plan.workers} workers need at least "
                                f"{-(-n // self.plan.workers)} chunk slots per worker, this "
                                f"destination has {self.params.chunk_slots}")
        routing = said.routing
        if routing not in {r.value for r in Routing}:
            raise ProtocolError("control.routing", f"{routing!r} is not a routing")
        chunk = said.chunk_bytes
        if chunk > self.params.chunk_bytes:
            raise ProtocolError("control.chunk_bytes", f"source packets of {chunk} B exceed "
                                f"the destination's slots of {self.params.chunk_bytes} B")

    async def _adopt_channels(self, listener: channels.Listener, migration_id: uuid.UUID,
                              count: int, tls: channels.TlsConfig | None) -> None:
        """Accept ``count`` data channels, channel k for worker k % D; refuse and log
        anything else."""
        routes = Routes(count, self.plan.workers)
        adopted: set[int] = set()
        try:
            await asyncio.wait_for(self._adopt_each(listener, migration_id, count, tls,
                                                    routes, adopted), CHANNELS_TIMEOUT_S)
        except TimeoutError:
            missing = sorted(set(range(count)) - adopted)
            raise ChannelError(f"data channel(s) {', '.join(map(str, missing))} did not "
                               f"connect within {CHANNELS_TIMEOUT_S:.0f} s") from None

    async def _adopt_each(self, listener: channels.Listener, migration_id: uuid.UUID,
                          count: int, tls: channels.TlsConfig | None, routes: Routes,
                          adopted: set[int]) -> None:
        """Accept until every channel is adopted (``adopted`` fills as they are)."""
        while len(adopted) < count:
            conn = await listener.accept()
            try:
                hello = await channels.read_hello(conn, timeout_s=listener.hello_timeout_s)
                refusal = _refusal(hello, migration_id, adopted, count)
                if refusal:
                    log.warning("refused a data channel: %s", refusal)
                    continue
                command = m.AdoptChannel(hello.index, wire.pack_hello(hello), tls)
                try:
                    await self.pool.call(routes.channel_owner(hello.index), command,
                                         fd=conn.fileno())
                except WorkerFailed as exc:  # its TLS handshake or inner hello failed
                    log.warning("refused data channel %d: %s", hello.index, exc)
                    continue
                adopted.add(hello.index)
            except (ChannelError, ProtocolError) as exc:
                log.warning("refused a connection: %s", exc)
            finally:
                conn.close()  # the worker holds its own duplicate of an adopted fd

    async def _load(self, main: socket.socket, concurrent: bool,
                    bound: liveness.PeerBound) -> int:
        """Send READY and load; the source aborting, vanishing or falling silent for
        ``bound`` ends the load. Heartbeats go out meanwhile, while every worker here
        answers, and stop before LOADED.

        Returns how many devices were loaded and verified.
        """
        gen = self.machine.next_gen()
        schedule = Schedule.CONCURRENT if concurrent else Schedule.SEQUENTIAL
        async with background(self.pool.call_all({
                w: m.Load(self.plan.devices_of(w), schedule, self.plan.owner, gen,
                          self.params.vcpu_cpus, self.params.vcpu_threads_for(concurrent),
                          self.params.vcpu_readback is Readback.BEFORE_COMMIT)
                for w in range(self.plan.workers)})) as (loading,):
            self._ready_ns = time.monotonic_ns()
            await channels.send(main, Ready(monotonic_clock_id()))
            async with liveness.SideAnswers(self.pool) as answers, \
                    liveness.Heartbeats(main, bound, answers):
                results: dict[int, int] = await self._unless_source_speaks(
                    main, loading, "the load", bound)
        return sum(results.values())

    async def _unless_source_speaks(self, main: channels.Channel, work: Awaitable[T],
                                    during: str, bound: liveness.PeerBound | None = None
                                    ) -> T:
        """Await ``work``; the source aborting or vanishing (anything on the main channel
        but a heartbeat) ends it first, and with a liveness ``bound`` its silence does."""
        watch = (liveness.recv(main, bound, "source", during) if bound is not None
                 else channels.recv_control(main))
        async with background(work, watch) as (working, watching):
            done, _ = await asyncio.wait({working, watching},
                                         return_when=asyncio.FIRST_COMPLETED)
            if watching in done:
                kind, body = watching.result()
                error = SourceAborted if kind is wire.ControlType.ABORT else ChannelError
                raise error(f"source sent {kind.name} during {during}: "
                            f"{body.get('reason', '')}")
            result: T = working.result()
            return result

    async def _discard(self, main: socket.socket, cause: BaseException, *,
                       committed: bool = False) -> None:
        """Tell the source the migration failed and put every device back to blank. After
        COMMIT the devices are stopped first and the message says nothing runs here: only
        then may the source resume."""
        log.info("incoming migration failed: %s", describe(cause))  # its command says it
        if not committed:
            await _tell_failed(main, cause, committed=False)
        with contextlib.suppress(DevstateError):  # bounded: a frozen worker is killed
            await self.pool.cancel(self.pool.alive())
        alive = self.pool.alive()
        if committed:  # some devices may have resumed: stop them before the reset
            with contextlib.suppress(DevstateError):
                await self.pool.call_all({w: m.Pause() for w in alive})
        with contextlib.suppress(DevstateError):
            await self.pool.call_all({w: m.Discard() for w in alive})
        self.machine.running = False
        if committed:
            await _tell_failed(main, cause, committed=True)


async def _tell_failed(main: channels.Channel, cause: BaseException, *,
                       committed: bool) -> None:
    with contextlib.suppress(Exception):  # the source may be gone: nothing to tell
        await commit.failed(main, describe(cause), committed=committed)


@contextlib.asynccontextmanager
async def _refusing_late_connections(listener: channels.Listener) -> AsyncIterator[None]:
    """While the body runs, every new connection is late: close it and say so."""
    async def refuse() -> None:
        while True:
            conn = await listener.accept()
            conn.close()
            log.warning("refused a late connection: every channel of the migration is "
                        "connected")

    async with background(refuse()):
        yield


def _refusal(hello: wire.Hello, migration_id: uuid.UUID, adopted: set[int],
             count: int) -> str:
    if hello.kind is not wire.ChannelKind.DATA:
        return "a second main channel"
    if hello.migration_id != migration_id:
        return f"migration id {hello.migration_id} is not {migration_id}"
    if hello.channels != count:
        return f"it counts {hello.channels} channels, not {count}"
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


class IncomingVM(Machine):
    """A machine whose devices start blank, waiting for a migration to load them."""

    def __init__(self, spec: MachineConfig, params: MigrationParams) -> None:
        super().__init__(spec, params, incoming=True, side="dest")
        self.incoming_migration = Incoming(self)

    async def accept_migration(self, listener: channels.Listener,
                               tls: channels.TlsConfig | None = None) -> IncomingResult:
        """:meth:`Incoming.accept_migration` into this machine."""
        return await self.incoming_migration.accept_migration(listener, tls)
