"""The save session of the ``vfio-sim`` device model (the resume session is :mod:`.resume`),
and the pacing both share.

Runs in: the device-model process, inside its ``selectors`` loop. A save session streams
the state (:mod:`devstate.devices.vfio.state`) into its data socket paced to the device's
read bandwidth; a resume session parses what the owner writes, paced to the write
bandwidth, and validates it when the device leaves RESUMING.
"""

from __future__ import annotations

import selectors
import socket
import time

import numpy as np

from devstate.devices.vfio.state import (
    CHUNK_BYTES,
    FORMAT_VERSION,
    MAGIC,
    DeviceState,
    InOrderDigest,
    Record,
    pack_record,
    stream_bytes,
)
from devstate.devices.vfio.uapi import (
    PrecopyInfo,
)

# Pacing: a session moves bytes in steps of at least QUANTUM (fewer, larger syscalls) and
# may catch up at most BURST_S of traffic after a pause (the reader stalled), so its
# average never beats the device's bandwidth.
QUANTUM = 64 << 10
BURST_S = 0.005
# Bytes one data event may move before the loop looks at the control socket again.
STEP_BYTES = 4 << 20

class TokenBucket:
    """Paces one side of a stream to ``rate`` bytes/s: a device's speed, not a network's."""

    def __init__(self, rate: float, now: float) -> None:
        self._rate = float(rate)
        self._cap = max(float(QUANTUM), self._rate * BURST_S)
        self._tokens = 0.0
        self._stamp = now

    def allowance(self, now: float) -> int:
        """Bytes that may move now; below QUANTUM means wait until :meth:`ready_at`."""
        self._tokens = min(self._cap, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        return int(self._tokens) if self._tokens >= QUANTUM else 0

    def spend(self, nbytes: int) -> None:
        """Account for ``nbytes`` moved."""
        self._tokens -= nbytes

    def ready_at(self, now: float) -> float:
        """When :meth:`allowance` reaches QUANTUM."""
        return now + max(0.0, QUANTUM - self._tokens) / self._rate


class StreamRejected(Exception):
    """The resume stream is invalid or incomplete; the message says where."""


class SaveSession:
    """A save session: streams the state into the model's end of the data socketpair.

    PRE_COPY streams the header and every chunk (the initial bytes). Meanwhile the running
    device rewrites state at ``dirty_rate`` bytes/s: each rewritten chunk gets a new
    generation, and one already sent is queued to be sent again (the dirty bytes). Once
    both are sent, PRE_COPY has nothing to send until more is dirtied or it is told it is
    in STOP_COPY, where the device no longer runs: it streams whatever is left and the end
    record, then shuts its end down so the reader sees read() == 0.
    """

    def __init__(self, state: DeviceState, sock: socket.socket, rate: float, *,
                 precopy: bool, now: float, dirty_rate: float = 0.0) -> None:
        self.sock = sock
        self._state = state
        self._bucket = TokenBucket(rate, now)
        self._stop_copy = not precopy
        self._pending: list[memoryview] = []
        self._header_queued = False
        # The initial pass over every chunk; chunks dirtied behind it wait in _resend.
        self._next_chunk = 0
        self._resend: dict[int, None] = {}  # insertion-ordered set of chunk indices
        self._dirty_rate = dirty_rate if precopy else 0.0
        self._dirty_owed = 0.0
        self._dirty_at = now
        self._rng = np.random.default_rng(state.content.seed ^ 0x5EED)
        self._end_queued = False
        self._finished = False
        self._sent = 0
        self._digest = InOrderDigest(state.chunk_count)
        self._digest_version = state.version

    def enter_stop_copy(self) -> None:
        """PRE_COPY* -> STOP_COPY: same fd; the device stopped: stream the rest, end it."""
        self._dirty(time.monotonic())
        self._stop_copy = True

    def precopy_info(self) -> PrecopyInfo:
        """Initial and dirty bytes the device has yet to write into the data fd."""
        self._dirty(time.monotonic())
        state = self._state
        dirty = sum(state.chunk_length(i) for i in self._resend)
        unsent = max(0, state.size - self._next_chunk * CHUNK_BYTES)
        return PrecopyInfo(unsent + sum(len(view) for view in self._pending), dirty)

    def _dirty(self, now: float) -> None:
        """Rewrite the chunks the running device has dirtied since the last look."""
        if self._stop_copy or not self._dirty_rate:
            return
        self._dirty_owed += (now - self._dirty_at) * self._dirty_rate
        self._dirty_at = now
        count = int(self._dirty_owed // CHUNK_BYTES)
        if not count:
            return
        self._dirty_owed -= count * CHUNK_BYTES
        state = self._state
        for index in self._rng.integers(0, state.chunk_count, count):
            state.generations[index] += 1
            if index < self._next_chunk:
                self._resend[int(index)] = None
        state.version += 1

    def remaining_bytes(self) -> int:
        """Estimated bytes until the end of the stream."""
        # Dirty re-sends can make a stream longer than a clean one: never below zero.
        return max(0, stream_bytes(self._state.size) - self._sent)

    def interest(self, now: float) -> tuple[int, float | None]:
        """(selector events wanted now, time to look again if paced)."""
        self._dirty(now)
        if not self._has_more():
            # Running with nothing to send: look again when the next chunk is dirtied.
            if self._dirty_rate and not self._finished:
                return 0, now + CHUNK_BYTES / self._dirty_rate
            return 0, None
        if not self._bucket.allowance(now):
            return 0, self._bucket.ready_at(now)
        return selectors.EVENT_WRITE, None

    def on_ready(self, now: float) -> None:
        """Write as much as pacing, the socket and STEP_BYTES allow."""
        moved = 0
        while moved < STEP_BYTES and (self._pending or self._refill()):
            budget = self._bucket.allowance(now)
            if not budget:
                return
            try:
                sent = self.sock.sendmsg(_first_bytes(self._pending, budget))
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError):
                self._finished = True  # the reader closed its fd: nobody to stream to
                return
            self._bucket.spend(sent)
            self._sent += sent
            moved += sent
            _drop_first_bytes(self._pending, sent)
            if self._end_queued and not self._pending:
                self.sock.shutdown(socket.SHUT_WR)  # the permanent end of stream
                self._finished = True

    def close(self) -> None:
        """End the session (leaving the saving group)."""
        self.sock.close()

    def _has_more(self) -> bool:
        if self._finished:
            return False
        return bool(self._pending or not self._header_queued
                    or self._next_chunk < self._state.chunk_count or self._resend
                    or (self._stop_copy and not self._end_queued))

    def _refill(self) -> bool:
        """Queue the next record; False if there is nothing to send yet."""
        state = self._state
        if not self._header_queued:
            self._header_queued = True
            content = state.content
            self._pending = [pack_record(Record.HEADER, MAGIC, FORMAT_VERSION, content.seed,
                                     state.size, CHUNK_BYTES, content.name_hash)]
        elif self._next_chunk < state.chunk_count or self._resend:
            if self._next_chunk < state.chunk_count:
                index = self._next_chunk
                self._next_chunk += 1
            else:
                index = next(iter(self._resend))
            self._resend.pop(index, None)  # sent now at its latest generation
            generation = int(state.generations[index])
            length = state.chunk_length(index)
            self._digest.feed(index, state.content.chunk_hash(index, generation, length))
            head = pack_record(Record.CHUNK, index, generation, length)
            stamp, body = state.content.parts(index, generation, length)
            # Sent straight from the content's own buffers: no pass to make the bytes.
            self._pending = [view for view in (head, memoryview(stamp), body) if len(view)]
        elif self._stop_copy and not self._end_queued:
            self._end_queued = True
            self._pending = [pack_record(Record.END, state.chunk_count, self._stream_digest())]
        else:
            return False
        return True

    def _stream_digest(self) -> bytes:
        in_order = self._digest.result()
        if in_order is not None:
            self._state.remember_digest(self._digest_version, in_order)
        return self._state.digest()


def _first_bytes(views: list[memoryview], limit: int) -> list[memoryview]:
    """The leading views of ``views`` holding at most ``limit`` bytes."""
    out: list[memoryview] = []
    for view in views:
        if limit <= 0:
            break
        out.append(view[:limit])
        limit -= len(view)
    return out


def _drop_first_bytes(views: list[memoryview], count: int) -> None:
    while count:
        if count >= len(views[0]):
            count -= len(views.pop(0))
        else:
            views[0] = views[0][count:]
            count = 0


