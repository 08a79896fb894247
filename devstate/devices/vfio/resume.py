"""The resume session of the ``vfio-sim`` device model: parse what the owner writes into
the data socket, paced to the write bandwidth, and validate it when the device leaves
RESUMING.

Runs in: the device-model process, inside its ``selectors`` loop.
"""

from __future__ import annotations

import math
import selectors
import socket
import time
from collections.abc import Callable

import numpy as np

from devstate.devices.vfio.session import STEP_BYTES, StreamRejected, TokenBucket
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
)


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
        """End the session, and drop the parser's references to its own methods: they make
        a reference cycle that would keep the session's buffers (a MiB and more) until the
        next full collection, which the model's GC-free sessions make rare."""
        self.sock.close()
        self._handlers.clear()
        self._then = _closed

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


def _closed() -> None:
    """What a closed session's parser does with more bytes: refuse them."""
    raise StreamRejected("the session is closed")
