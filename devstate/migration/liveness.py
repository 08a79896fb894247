"""The liveness rule: while a save and load run, each side hears from its peer within a bound.

Runs in: both coordinators, on the main channel, from READY until the commit is decided.

A frozen peer (a SIGSTOPped coordinator or worker, a whole process group stopped, a link
where nothing moves) sends nothing and closes nothing: without a bound, the other side
would wait for ever with the VM paused. QEMU behaves so too and leaves it to the operator
(``yank``, ``migrate_cancel``); devstate decides on its own::

    each side, every HEARTBEAT_S:  ask each of its own workers for its progress (one small
                                   round trip each); once all answered, send HEARTBEAT
                                   (answers slower than HEARTBEAT_S: as soon as they came)
    each side, reading the main channel: any message restarts the clock; silence for the
                                   bound raises PeerSilent

A heartbeat stands for the whole side, not only its coordinator: a frozen worker stops its
side's beats just as a frozen coordinator does (its bytes stop too, but a peer cannot tell
a stopped stream from a slow device; a stalled pool query it can). A worker that has not
answered yet but whose loop is *runnable* (on a CPU or waiting for one, not stopped or
blocked) is starved, not frozen: a busy guest's vCPU threads share the host's cores with
the VM's owner, whose answers then take seconds (1.2-2.0 s with 288 vCPUs on 2 cores,
measured). It counts as answered, for RUNNABLE_GRACE_S at most (:class:`SideAnswers`),
since a loop spinning in a bug is runnable too. The source sends beats
until it commits, the destination until it says LOADED: after those, each waits for one
prompt reply (COMMIT, RESUMED) under the same bound.

The bound (:func:`peer_bound`) is ``params.peer_timeout_s`` if set, else
PEER_TIMEOUT_FACTOR times the larger of the downtime limit and the expected downtime,
within [PEER_TIMEOUT_FLOOR_S, PEER_TIMEOUT_CEILING_S]: a migration expected to take
100 ms gives up on a silent peer after 5 s, none waits more than 60 s. The source sends it
in HELLO; the destination holds the source to it (unless its own parameters set one).
What follows the silence is the two-phase commit's rule: before COMMIT the source resumes
and the destination discards; after it the source stays stopped and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from devstate.config.params import MigrationParams
from devstate.errors import ChannelError, DevstateError
from devstate.net import channels
from devstate.protocol import wire
from devstate.protocol.control import Heartbeat, M, decode_as
from devstate.worker import jobs
from devstate.worker.pool import WorkerPool

PEER_TIMEOUT_FLOOR_S = 5.0
PEER_TIMEOUT_CEILING_S = 60.0
PEER_TIMEOUT_FACTOR = 10.0
# At least a few beats fit in any bound, so that one late beat is never taken for silence.
HEARTBEAT_S = 1.0
BEATS_PER_BOUND = 4
# How long a runnable worker's silence passes for starvation, and how often a side looks
# at the state of the workers it waits for.
RUNNABLE_GRACE_S = PEER_TIMEOUT_CEILING_S
ANSWER_POLL_S = 0.05


class PeerSilent(ChannelError):
    """The peer said nothing on the main channel for the liveness bound: it is frozen, or
    the link is."""

    def __init__(self, peer: str, bound: PeerBound, during: str) -> None:
        super().__init__(f"peer timeout: no word from the {peer} for {bound.seconds:.1f} s "
                         f"during {during} ({bound.why})")
        self.bound = bound


@dataclass(frozen=True, slots=True)
class PeerBound:
    """How long to wait for a silent peer, and how that was decided (said in the error)."""

    seconds: float
    why: str

    @property
    def beat_s(self) -> float:
        """How often this side sends its own heartbeat under this bound."""
        return min(HEARTBEAT_S, self.seconds / BEATS_PER_BOUND)


def peer_bound(params: MigrationParams, expected_ms: float | None) -> PeerBound:
    """The source's bound for a migration expected to stop the VM for ``expected_ms``."""
    if params.peer_timeout_s is not None:
        return PeerBound(params.peer_timeout_s, "the peer timeout set")
    basis_ms = max(params.downtime_limit_ms or 0.0, expected_ms or 0.0)
    derived = PEER_TIMEOUT_FACTOR * basis_ms / 1e3
    seconds = min(PEER_TIMEOUT_CEILING_S, max(PEER_TIMEOUT_FLOOR_S, derived))
    return PeerBound(seconds, f"the peer timeout: {PEER_TIMEOUT_FACTOR:.0f} x the downtime "
                              f"limit or estimate of {basis_ms:.0f} ms, within "
                              f"{PEER_TIMEOUT_FLOOR_S:.0f}-{PEER_TIMEOUT_CEILING_S:.0f} s")


def destination_bound(params: MigrationParams, announced_s: float | None) -> PeerBound:
    """The destination's bound: its own ``params.peer_timeout_s``, else the source's."""
    if params.peer_timeout_s is not None:
        return PeerBound(params.peer_timeout_s, "the peer timeout set")
    if announced_s is not None:
        return PeerBound(announced_s, "the source's peer timeout")
    return PeerBound(PEER_TIMEOUT_CEILING_S, "the longest peer timeout: the source named "
                                             "none")


async def recv(sock: channels.Channel, bound: PeerBound, peer: str, during: str
               ) -> tuple[wire.ControlType, dict[str, Any]]:
    """The next control message other than a heartbeat; :class:`PeerSilent` once the
    ``peer`` said nothing at all for the bound."""
    while True:
        try:
            async with asyncio.timeout(bound.seconds):
                kind, body = await channels.recv_control(sock)
        except TimeoutError:
            raise PeerSilent(peer, bound, during) from None
        if kind is not Heartbeat.kind:
            return kind, body


async def expect(sock: channels.Channel, cls: type[M], bound: PeerBound, peer: str,
                 during: str) -> M:
    """:func:`devstate.net.channels.expect` under the liveness rule: heartbeats pass, a
    silent peer raises :class:`PeerSilent`, FAILED raises :class:`PeerFailed`."""
    kind, body = await recv(sock, bound, peer, during)
    return decode_as(cls, channels.checked(kind, body, cls.kind))


class SideAnswers:
    """A side's heartbeat condition: ``await answers()`` returns once every worker of
    ``pool`` answered a small query, or each that has not yet is runnable and was asked
    less than ``grace_s`` ago. A query not answered stays asked, one per worker: the next
    beat waits for the same answer, so a starved worker's queue does not grow. An async
    context manager: the queries still asked end with it.
    """

    def __init__(self, pool: WorkerPool, grace_s: float = RUNNABLE_GRACE_S) -> None:
        self._pool = pool
        self._grace_s = grace_s
        self._asked: dict[int, tuple[asyncio.Task[object], float]] = {}

    async def __aenter__(self) -> SideAnswers:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        tasks = [task for task, _ in self._asked.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._asked.clear()

    async def __call__(self) -> None:
        """Return once the side counts as alive; a worker's failure (lost) raises."""
        loop = asyncio.get_running_loop()
        for w in range(self._pool.size):
            asked = self._asked.get(w)
            if asked is None or asked[0].done():
                if asked is not None:
                    asked[0].result()
                self._asked[w] = (loop.create_task(self._pool.call(w, jobs.Progress())),
                                  loop.time())
        while True:
            waiting = {w: asked for w, asked in self._asked.items() if not asked[0].done()}
            for w in self._asked.keys() - waiting.keys():
                self._asked[w][0].result()  # a lost worker raises
            if all(loop.time() - since < self._grace_s and self._pool.runnable(w)
                   for w, (_, since) in waiting.items()):
                return
            await asyncio.wait([task for task, _ in waiting.values()], timeout=ANSWER_POLL_S,
                               return_when=asyncio.FIRST_COMPLETED)


class Heartbeats:
    """Sends HEARTBEAT on ``sock`` every ``bound.beat_s`` while ``alive()`` (a query of this
    side's workers) answers; an async context manager, stopped on exit or by :meth:`stop`.

    A message is never cut in two: :meth:`stop` lets a beat being sent finish, so that the
    next message on the channel starts on a message boundary.
    """

    def __init__(self, sock: channels.Channel, bound: PeerBound,
                 alive: Callable[[], Awaitable[object]]) -> None:
        self._sock = sock
        self._bound = bound
        self._alive = alive
        self._task: asyncio.Task[None] | None = None
        self._sending: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Heartbeats:
        self._task = asyncio.get_running_loop().create_task(self._beat())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Send no more beats; return once none is half sent (within the bound: a beat
        that cannot go out in that long has met a peer that stopped reading)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        if self._sending is not None and not self._sending.done():
            await asyncio.wait({self._sending}, timeout=self._bound.seconds)

    async def _beat(self) -> None:
        # Any error ends the beats quietly: whatever broke (a lost worker, a closed
        # channel) fails the save or load itself, which says why.
        with contextlib.suppress(DevstateError, OSError):
            while True:
                # The next beat is due a beat after the last, and the workers' answers
                # count toward that wait, not on top of it: a host whose cores a busy
                # guest holds can delay them by seconds (the VM's owner shares them with
                # every runnable vCPU thread: 1.2-2.0 s with 288 on 2 cores, measured).
                await asyncio.gather(asyncio.sleep(self._bound.beat_s), self._alive())
                self._sending = asyncio.ensure_future(channels.send(self._sock, Heartbeat()))
                self._sending.add_done_callback(_retrieve)
                await asyncio.shield(self._sending)


def _retrieve(sending: asyncio.Future[None]) -> None:
    """Mark a beat's failure seen: a beat that stop() let finish has no one awaiting it."""
    if not sending.cancelled():
        sending.exception()
