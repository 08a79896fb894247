"""Save and resume sessions of the ``vfio-sim`` device model: one data socket each.

Runs in: the device-model process, inside its ``selectors`` loop. A save session streams
the state (:mod:`devstate.devices.vfio.state`) into its data socket paced to the device's
read bandwidth; a resume session parses what the owner writes, paced to the write
bandwidth, and validates it when the device leaves RESUMING.
"""

from __future__ import annotations

import math
import selectors
import socket
import time
from collections.abc import Callable

import numpy as np

from devstate.devices.vfio.state import (
    CHUNK_BYTES,
    CHUNK_WORDS,
    FORMAT_VERSION,
    MAGIC,
    RECORD_BODY,
    RECORD_KIND,
    ChunkContent,
    DeviceState,
    InOrderDigest,
    Record,
    chunk_hash_of,
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


class ResumeSession:
    """A resume session: parses and checks the stream as it arrives, in any segmentation.

    Every chunk's bytes are proven equal to what (seed, index, generation) generates: in a
    stream that sends each chunk once in index order, by the in-order digest checked against
    the end record (one hash pass, no regeneration); otherwise by comparing each chunk's
    64-bit hash, kept as it arrives, with the generated content's at the end. The first
    problem is kept and the rest of the stream is read and dropped, so the writer never
    blocks; :meth:`finish` (RESUMING -> STOP) reports it.
    """

    def __init__(self, state: DeviceState, sock: socket.socket, rate: float,
                 now: float) -> None:
        self.sock = sock
        self._own = state
        self._bucket = TokenBucket(rate, now)
        self._content: ChunkContent | None = None  # the stream's, once its header is read
        self._generations = np.zeros(state.chunk_count, np.uint32)
        self._present = np.zeros(state.chunk_count, bool)
        self._chunk_hashes = np.zeros(state.chunk_count, np.uint64)
        self._end: tuple[int, bytes] | None = None
        self._error: str | None = None
        self._digest = InOrderDigest(state.chunk_count)
        self._eof = False
        self._offset = 0  # stream bytes consumed
        self._small = memoryview(bytearray(64))
        self._chunk = np.empty(CHUNK_WORDS, np.uint64)
        self._chunk_bytes = self._chunk.data.cast("B")
        self._chunk_at: tuple[int, int] = (0, 0)  # (index, generation) being received
        # The parser: the bytes it waits for go into _target; _then runs when it is full.
        self._target = self._small[:0]
        self._filled = 0
        self._then: Callable[[], None] = self._on_kind
        self._handlers: dict[Record, Callable[[], None]] = {
            Record.HEADER: self._on_header, Record.CHUNK: self._on_chunk_head,
            Record.END: self._on_end}
        self._expect_record()

    def interest(self, now: float) -> tuple[int, float | None]:
        """(selector events wanted now, time to look again if paced)."""
        if self._eof:
            return 0, None
        if not self._bucket.allowance(now):
            return 0, self._bucket.ready_at(now)
        return selectors.EVENT_READ, None

    def on_ready(self, now: float) -> None:
        """Read and parse as much as pacing, the socket and STEP_BYTES allow."""
        self._pump(now, STEP_BYTES)

    def finish(self) -> tuple[ChunkContent, np.ndarray, bytes]:
        """Consume what was written, validate it; (content, generations, digest) to adopt.

        Raises :class:`StreamRejected` naming the first problem.
        """
        while (wake_at := self._pump(time.monotonic(), math.inf)) is not None:
            time.sleep(max(0.0, wake_at - time.monotonic()))
        if self._error is not None:
            raise StreamRejected(self._error)
        if self._filled:
            raise StreamRejected(f"stream truncated inside a record at byte {self._offset}")
        if self._content is None:
            raise StreamRejected("stream incomplete (no header record)")
        missing = np.flatnonzero(~self._present)
        if missing.size:
            more = f", {missing.size} chunks in all" if missing.size > 1 else ""
            raise StreamRejected(f"stream incomplete (chunk {missing[0]} missing{more})")
        if self._end is None:
            raise StreamRejected("stream incomplete (no end record)")
        return self._content, self._generations, self._check_end(self._content, *self._end)

    def close(self) -> None:
        """End the session."""
        self.sock.close()

    def _check_end(self, content: ChunkContent, count: int, digest: bytes) -> bytes:
        if count != self._own.chunk_count:
            raise StreamRejected(f"end record counts {count} chunks; the device has "
                                 f"{self._own.chunk_count}")
        loaded = self._digest.result()
        # Out of order, the digest of the generated state proves nothing about the bytes
        # received: check each chunk's hash first. In order, do so only to name a culprit.
        if loaded is None or loaded != digest:
            wrong = self._first_wrong_chunk(content)
            if wrong is not None:
                raise StreamRejected(f"chunk {wrong} (generation "
                                     f"{int(self._generations[wrong])}) differs from the "
                                     "device's content")
        if loaded is None:
            loaded = DeviceState(content, self._own.size, self._generations).digest()
        if loaded != digest:
            raise StreamRejected(f"digest mismatch: the end record says {digest.hex()}, "
                                 f"the loaded state is {loaded.hex()}")
        return digest

    def _pump(self, now: float, limit: float) -> float | None:
        """Receive until the socket is empty, EOF or ``limit`` bytes; the pacing wake-up if
        pacing stopped it, else None."""
        moved = 0
        while moved < limit and not self._eof:
            budget = self._bucket.allowance(now)
            if not budget:
                return self._bucket.ready_at(now)
            want = min(len(self._target) - self._filled, budget)
            try:
                got = self.sock.recv_into(self._target[self._filled:], want)
            except BlockingIOError:
                return None
            except ConnectionResetError:
                got = 0
            if not got:
                self._eof = True
                return None
            self._bucket.spend(got)
            moved += got
            self._offset += got
            self._filled += got
            if self._filled == len(self._target):
                self._then()
        return None

    def _expect(self, target: memoryview, then: Callable[[], None]) -> None:
        self._target, self._filled, self._then = target, 0, then

    def _expect_record(self) -> None:
        self._expect(self._small[:RECORD_KIND.size], self._on_kind)

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._expect(self._chunk_bytes, self._fail_again)  # drop the rest

    def _fail_again(self) -> None:
        self._expect(self._chunk_bytes, self._fail_again)

    def _on_kind(self) -> None:
        (kind,) = RECORD_KIND.unpack_from(self._small)
        problem = self._kind_problem(kind, at=self._offset - RECORD_KIND.size)
        if problem is not None:
            self._fail(problem)
        else:
            self._expect(self._small[:RECORD_BODY[Record(kind)].size], self._handlers[Record(kind)])

    def _kind_problem(self, kind: int, at: int) -> str | None:
        if self._end is not None:
            return f"bytes after the end record at byte {at}"
        if kind not in RECORD_BODY:
            return f"unknown record kind {kind} at byte {at}"
        if kind == Record.HEADER and self._content is not None:
            return f"a second header record at byte {at}"
        if kind != Record.HEADER and self._content is None:
            return f"{Record(kind).name.lower()} record before the header"
        return None

    def _on_header(self) -> None:
        magic, fmt, seed, size, chunk_bytes, name_hash = RECORD_BODY[Record.HEADER].unpack_from(
            self._small)
        own = self._own
        problem = None
        if magic != MAGIC:
            problem = f"not a vfio-sim stream (magic {magic!r})"
        elif fmt != FORMAT_VERSION:
            problem = f"stream format {fmt}; this device reads {FORMAT_VERSION}"
        elif name_hash != own.content.name_hash:
            problem = f"stream is from another device (not {own.content.name!r})"
        elif size != own.size:
            problem = f"stream is from a device of {size} bytes; this one has {own.size}"
        elif chunk_bytes != CHUNK_BYTES:
            problem = f"stream chunks of {chunk_bytes} bytes; expected {CHUNK_BYTES}"
        if problem is not None:
            self._fail(problem)
            return
        self._content = (own.content if seed == own.content.seed
                         else ChunkContent(seed, own.content.name))
        self._expect_record()

    def _on_chunk_head(self) -> None:
        index, generation, length = RECORD_BODY[Record.CHUNK].unpack_from(self._small)
        count = self._own.chunk_count
        if index >= count:
            self._fail(f"chunk index {index} out of range (the device has {count} chunks)")
        elif length != self._own.chunk_length(index):
            self._fail(f"chunk {index} has {length} bytes; expected "
                       f"{self._own.chunk_length(index)}")
        else:
            self._chunk_at = (index, generation)
            self._expect(self._chunk_bytes[:length], self._on_chunk_data)

    def _on_chunk_data(self) -> None:
        index, generation = self._chunk_at
        received = self._chunk_bytes[:self._filled]
        chunk_hash = chunk_hash_of(received)
        self._digest.feed(index, chunk_hash)
        self._chunk_hashes[index] = chunk_hash
        self._generations[index] = generation
        self._present[index] = True
        self._expect_record()

    def _first_wrong_chunk(self, content: ChunkContent) -> int | None:
        """The first chunk whose received bytes are not its generated content, if any."""
        state = DeviceState(content, self._own.size, self._generations)
        for index in range(state.chunk_count):
            made = content.chunk_hash(index, int(self._generations[index]),
                                      state.chunk_length(index))
            if made != int(self._chunk_hashes[index]):
                return index
        return None

    def _on_end(self) -> None:
        count, digest = RECORD_BODY[Record.END].unpack_from(self._small)
        self._end = (count, digest)
        self._expect_record()
