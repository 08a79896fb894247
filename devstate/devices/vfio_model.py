"""The ``vfio-sim`` device model: one process per simulated VFIO device.

Runs in: its own process, started by :class:`devstate.devices.vfio_sim.VfioSimDevice` as
``python -m devstate.devices.vfio_model --control-fd N --config JSON``. Single-threaded: one
``selectors`` loop serves the control socket and, while a session is open, the data socket,
so control requests are answered while a stream flows. It plays the part of a VFIO variant
driver behind the migration uAPI v2 (:mod:`devstate.devices.vfio_uapi`)::

    client (owner worker)                          this process
    control fd, SOCK_SEQPACKET -- Request ------>  next_path() -> arcs -> session effects
                               <-- Reply (+fd) -
    data fd, SOCK_STREAM, one per session <------  save stream, paced to read_bandwidth
                                          ------>  resume stream, paced to write_bandwidth

The state is ``size`` bytes in 1 MiB chunks (the last one partial), never made
whole: chunk i at generation g is a 16-byte stamp (a 64-bit key of the device, i and g,
then i and g) followed by the rest of the device's random base block, so the state is one
generation number per chunk. A chunk is sent as (stamp, a view of the base block): the
model spends no pass over the bytes to make them, and the chunk hash the state digest is
built from is xxh3_64(stamp) ^ xxh3_64(body), with the body's hash computed once per
length. A device starts at generation 0, or blank (BLANK_GENERATION: zero bytes) if it is
incoming; a load adopts the stream's generations and seed.

The save stream (little-endian; opaque to the client, like any VFIO device's)::

    header  kind=1 u32 | magic 8s | format u32 | seed u64 | size u64 | chunk_bytes u32
            | name_hash u64
    chunk   kind=2 u32 | index u64 | generation u32 | length u32 | bytes[length]
    end     kind=3 u32 | chunk_count u64 | digest 16s (the state digest: xxh3_128 over each
            chunk's xxh3_64, in order)

A chunk record may repeat an index; the last one wins (precopy re-sends dirtied chunks).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import enum
import errno
import gc
import math
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from devstate.devices.vfio_uapi import (
    PRECOPY_STATES,
    InvalidTransition,
    ModelConfig,
    Op,
    PrecopyInfo,
    Reply,
    Request,
    Session,
    VfioState,
    next_path,
    session_effect,
)
from devstate.fdio import tune_for_bulk

CHUNK_BYTES = 1 << 20
# The generation of a chunk that holds zero bytes: an incoming device before its load.
BLANK_GENERATION = 0xFFFF_FFFF
_WORDS = CHUNK_BYTES // 8
_MASK64 = (1 << 64) - 1

MAGIC = b"DSVFIOST"
FORMAT_VERSION = 1


class Record(enum.IntEnum):
    """The kind word that starts every record of the stream."""

    HEADER = 1
    CHUNK = 2
    END = 3


_KIND = struct.Struct("<I")
_BODY: dict[Record, struct.Struct] = {
    Record.HEADER: struct.Struct("<8sIQQIQ"),  # magic, format, seed, size, chunk_bytes, name
    Record.CHUNK: struct.Struct("<QII"),  # index, generation, length (bytes follow)
    Record.END: struct.Struct("<Q16s"),  # chunk count, digest
}

# Pacing: a session moves bytes in steps of at least QUANTUM (fewer, larger syscalls) and
# may catch up at most BURST_S of traffic after a pause (the reader stalled), so its
# average never beats the device's bandwidth.
QUANTUM = 64 << 10
BURST_S = 0.005
# Bytes one data event may move before the loop looks at the control socket again.
STEP_BYTES = 4 << 20

PR_SET_PDEATHSIG = 1


def chunk_count(size: int) -> int:
    """Chunks of a ``size``-byte state: all of CHUNK_BYTES but a partial last one."""
    return -(-size // CHUNK_BYTES)


def stream_bytes(size: int) -> int:
    """Length of a full save stream (header, every chunk once, end) of a ``size``-byte state."""
    chunks = chunk_count(size)
    return (_KIND.size * (chunks + 2) + _BODY[Record.HEADER].size + _BODY[Record.END].size
            + chunks * _BODY[Record.CHUNK].size + size)


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints, so distinct inputs stay distinct."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


STAMP_BYTES = 16
_STAMP = struct.Struct("<QII")


class ChunkContent:
    """What chunk ``i`` at generation ``g`` holds, for one (machine seed, device name)."""

    def __init__(self, seed: int, name: str) -> None:
        self.seed = seed
        self.name = name
        self.name_hash = xxhash.xxh3_64_intdigest(name.encode())
        rng = np.random.default_rng([seed, self.name_hash])
        self._base = rng.bytes(CHUNK_BYTES)
        self._salt = _mix64(seed ^ self.name_hash)
        self._body_hashes: dict[tuple[bool, int], int] = {}

    def parts(self, index: int, generation: int, length: int) -> tuple[bytes, memoryview]:
        """Chunk ``index`` at ``generation`` as (stamp, body), without copying a byte."""
        if generation == BLANK_GENERATION:
            return bytes(min(length, STAMP_BYTES)), memoryview(_BLANK)[STAMP_BYTES:length]
        # index < 2**32 (64 GiB of 1 MiB chunks) and generation is u32: the pair is unique.
        key = _mix64(self._salt ^ (index << 32 | generation))
        stamp = _STAMP.pack(key, index, generation)
        return stamp[:length], memoryview(self._base)[STAMP_BYTES:length]

    def chunk_hash(self, index: int, generation: int, length: int) -> int:
        """:func:`_chunk_hash` of the chunk, with the body's hash computed once per length."""
        stamp, body = self.parts(index, generation, length)
        blank = generation == BLANK_GENERATION
        body_hash = self._body_hashes.get((blank, length))
        if body_hash is None:
            body_hash = self._body_hashes[(blank, length)] = xxhash.xxh3_64_intdigest(body)
        return xxhash.xxh3_64_intdigest(stamp) ^ body_hash


_BLANK = bytes(CHUNK_BYTES)


class DeviceState:
    """A device's state: chunk i is ``content`` at ``generations[i]``; the last is partial.

    ``version`` changes whenever any chunk's bytes may have (a load adopts a new state; the
    dirty-rate model will bump generations), and keys the cached digest.
    """

    def __init__(self, content: ChunkContent, size: int, generations: np.ndarray) -> None:
        self.content = content
        self.size = size
        self.chunk_count = len(generations)
        self.generations = generations
        self.version = 0
        self._digest: tuple[int, bytes] | None = None

    def chunk_length(self, index: int) -> int:
        """Bytes of chunk ``index``: CHUNK_BYTES except for a partial last chunk."""
        return min(CHUNK_BYTES, self.size - index * CHUNK_BYTES)

    def digest(self) -> bytes:
        """The state digest (xxh3_128 over each chunk's xxh3_64), once per version."""
        if self._digest is None or self._digest[0] != self.version:
            hasher = xxhash.xxh3_128()
            for index in range(self.chunk_count):
                chunk_hash = self.content.chunk_hash(index, int(self.generations[index]),
                                                     self.chunk_length(index))
                hasher.update(chunk_hash.to_bytes(8, "little"))
            self._digest = (self.version, hasher.digest())
        return self._digest[1]

    def remember_digest(self, version: int, digest: bytes) -> None:
        """Cache a digest someone computed anyway (a stream hashed in order) for ``version``."""
        if version == self.version:
            self._digest = (version, digest)

    def adopt(self, content: ChunkContent, generations: np.ndarray, digest: bytes) -> None:
        """Become a loaded state (already validated, with its digest)."""
        self.content = content
        self.generations = generations
        self.version += 1
        self._digest = (self.version, digest)


def _chunk_hash(data: memoryview) -> int:
    """The hash of one chunk's bytes, the unit the state digest is built from.

    Stamp and body are hashed apart so that a sender can reuse the body's hash; together
    they still cover every byte once.
    """
    return (xxhash.xxh3_64_intdigest(data[:STAMP_BYTES])
            ^ xxhash.xxh3_64_intdigest(data[STAMP_BYTES:]))


def digest_of(data: bytes | memoryview) -> bytes:
    """The state digest of a state given as plain bytes (tests, tools)."""
    view = memoryview(data)
    hasher = xxhash.xxh3_128()
    for start in range(0, len(view), CHUNK_BYTES):
        hasher.update(_chunk_hash(view[start:start + CHUNK_BYTES]).to_bytes(8, "little"))
    return hasher.digest()


class InOrderDigest:
    """The state digest of chunks seen in index order, each once: a stream's digest for free.

    The state digest is xxh3_128 over every chunk's xxh3_64, in index order: one pass over
    the bytes proves all of them, and a chunk hashed on arrival serves both this digest and
    the check of a chunk that arrives out of order. Any other order (a repeated, dirtied
    chunk) spoils it and the caller digests the state instead.
    """

    def __init__(self, chunk_count: int) -> None:
        self._hasher = xxhash.xxh3_128()
        self._chunk_count = chunk_count
        self._next = 0
        self._spoilt = False

    def feed(self, index: int, chunk_hash: int) -> None:
        """Account for chunk ``index`` by its :func:`_chunk_hash`."""
        if self._spoilt or index != self._next:
            self._spoilt = True
            return
        self._hasher.update(chunk_hash.to_bytes(8, "little"))
        self._next += 1

    def result(self) -> bytes | None:
        """The digest if every chunk came exactly once in order, else None."""
        if self._spoilt or self._next != self._chunk_count:
            return None
        return self._hasher.digest()


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

    PRE_COPY streams the header and every chunk (the initial bytes) and then has nothing to
    send until it is told it is in STOP_COPY; STOP_COPY streams whatever is left and the end
    record, then shuts its end down so the reader sees read() == 0.
    """

    def __init__(self, state: DeviceState, sock: socket.socket, rate: float, *,
                 precopy: bool, now: float) -> None:
        self.sock = sock
        self._state = state
        self._bucket = TokenBucket(rate, now)
        self._stop_copy = not precopy
        self._pending: list[memoryview] = []
        self._header_queued = False
        # The initial pass over every chunk. The dirty-rate model (issue 5) will queue
        # re-sends of chunks dirtied behind this cursor.
        self._next_chunk = 0
        self._end_queued = False
        self._finished = False
        self._sent = 0
        self._initial_bytes = stream_bytes(state.size) - _KIND.size - _BODY[Record.END].size
        self._digest = InOrderDigest(state.chunk_count)
        self._digest_version = state.version

    def enter_stop_copy(self) -> None:
        """PRE_COPY* -> STOP_COPY: same fd; stream the rest and end it."""
        self._stop_copy = True

    def precopy_info(self) -> PrecopyInfo:
        """Initial and dirty bytes the device has yet to write into the data fd."""
        return PrecopyInfo(max(0, self._initial_bytes - self._sent), 0)

    def remaining_bytes(self) -> int:
        """Estimated bytes until the end of the stream."""
        return stream_bytes(self._state.size) - self._sent

    def interest(self, now: float) -> tuple[int, float | None]:
        """(selector events wanted now, time to look again if paced)."""
        if not self._has_more():
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
                    or self._next_chunk < self._state.chunk_count
                    or (self._stop_copy and not self._end_queued))

    def _refill(self) -> bool:
        """Queue the next record; False if there is nothing to send yet."""
        state = self._state
        if not self._header_queued:
            self._header_queued = True
            content = state.content
            self._pending = [_record(Record.HEADER, MAGIC, FORMAT_VERSION, content.seed,
                                     state.size, CHUNK_BYTES, content.name_hash)]
        elif self._next_chunk < state.chunk_count:
            index = self._next_chunk
            self._next_chunk += 1
            generation = int(state.generations[index])
            length = state.chunk_length(index)
            self._digest.feed(index, state.content.chunk_hash(index, generation, length))
            head = _record(Record.CHUNK, index, generation, length)
            stamp, body = state.content.parts(index, generation, length)
            # Sent straight from the content's own buffers: no pass to make the bytes.
            self._pending = [view for view in (head, memoryview(stamp), body) if len(view)]
        elif self._stop_copy and not self._end_queued:
            self._end_queued = True
            self._pending = [_record(Record.END, state.chunk_count, self._stream_digest())]
        else:
            return False
        return True

    def _stream_digest(self) -> bytes:
        in_order = self._digest.result()
        if in_order is not None:
            self._state.remember_digest(self._digest_version, in_order)
        return self._state.digest()


def _record(kind: Record, *fields: object) -> memoryview:
    return memoryview(_KIND.pack(kind) + _BODY[kind].pack(*fields))


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
        self._chunk = np.empty(_WORDS, np.uint64)
        self._chunk_bytes = memoryview(self._chunk).cast("B")
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
        self._expect(self._small[:_KIND.size], self._on_kind)

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._expect(self._chunk_bytes, self._fail_again)  # drop the rest

    def _fail_again(self) -> None:
        self._expect(self._chunk_bytes, self._fail_again)

    def _on_kind(self) -> None:
        (kind,) = _KIND.unpack_from(self._small)
        problem = self._kind_problem(kind, at=self._offset - _KIND.size)
        if problem is not None:
            self._fail(problem)
        else:
            self._expect(self._small[:_BODY[Record(kind)].size], self._handlers[Record(kind)])

    def _kind_problem(self, kind: int, at: int) -> str | None:
        if self._end is not None:
            return f"bytes after the end record at byte {at}"
        if kind not in _BODY:
            return f"unknown record kind {kind} at byte {at}"
        if kind == Record.HEADER and self._content is not None:
            return f"a second header record at byte {at}"
        if kind != Record.HEADER and self._content is None:
            return f"{Record(kind).name.lower()} record before the header"
        return None

    def _on_header(self) -> None:
        magic, fmt, seed, size, chunk_bytes, name_hash = _BODY[Record.HEADER].unpack_from(
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
        index, generation, length = _BODY[Record.CHUNK].unpack_from(self._small)
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
        chunk_hash = _chunk_hash(received)
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
        count, digest = _BODY[Record.END].unpack_from(self._small)
        self._end = (count, digest)
        self._expect_record()


class ProtocolViolation(Exception):
    """The owner sent something that is not a request: a bug to report, not to serve."""


class DeviceModel:
    """One simulated device: its FSM state, its device state and at most one session."""

    def __init__(self, config: ModelConfig, control: socket.socket) -> None:
        self._config = config
        self._control = control
        first = BLANK_GENERATION if config.incoming else 0
        self._state = DeviceState(ChunkContent(config.seed, config.name), config.size,
                                  np.full(chunk_count(config.size), first, np.uint32))
        self._fsm = VfioState.RUNNING
        self._session: SaveSession | ResumeSession | None = None
        self._selector = selectors.DefaultSelector()
        self._watching: tuple[socket.socket, int] | None = None
        self._handlers: dict[Op, Callable[[Request], tuple[Reply, socket.socket | None]]] = {
            Op.SET_STATE: self._set_state, Op.GET_STATE: self._get_state,
            Op.GET_DATA_SIZE: self._get_data_size, Op.GET_PRECOPY_INFO: self._get_precopy_info,
            Op.GET_DIGEST: self._get_digest, Op.RESET: self._reset}

    def run(self) -> None:
        """Say hello, then serve until the owner quits or goes away."""
        self._selector.register(self._control, selectors.EVENT_READ)
        try:
            if not self._send(Reply(0, Op.HELLO, self._fsm, flags=self._config.flags)):
                return
            while True:
                wake_at = self._watch_data(time.monotonic())
                timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._control:
                        if not self._serve_one():
                            return
                    elif self._session is not None and key.fileobj is self._session.sock:
                        self._session.on_ready(time.monotonic())
        finally:
            self._end_session()
            self._selector.close()

    def _watch_data(self, now: float) -> float | None:
        """Register the session socket for what it wants now; return its pacing wake-up."""
        want: tuple[socket.socket, int] | None = None
        wake_at = None
        if self._session is not None:
            events, wake_at = self._session.interest(now)
            if events:
                want = (self._session.sock, events)
        if want != self._watching:
            if self._watching is not None:
                self._selector.unregister(self._watching[0])
            if want is not None:
                self._selector.register(*want)
            self._watching = want
        return wake_at

    def _serve_one(self) -> bool:
        """Answer one request; False when the model should exit (QUIT, or the owner left)."""
        try:
            data = self._control.recv(Reply.MAX_BYTES)  # room to see an oversized request
        except ConnectionResetError:
            return False
        if not data:  # EOF: the owner closed the control socket or died
            return False
        try:
            request = Request.unpack(data)
        except ValueError as exc:
            raise ProtocolViolation(f"malformed control request: {exc}") from exc
        if request.op is Op.QUIT:
            return False
        handler = self._handlers.get(request.op)
        if handler is None:
            return self._send(self._reply(request, errno=errno.EINVAL,
                                          detail=f"{request.op.name} is not a request"))
        reply, data_sock = handler(request)
        try:
            return self._send(reply, data_sock)
        finally:
            if data_sock is not None:
                data_sock.close()  # the owner has its own copy now

    def _send(self, reply: Reply, data_sock: socket.socket | None = None) -> bool:
        """Send a reply (with the client's end of a new session); False if the owner left."""
        try:
            if data_sock is None:
                self._control.send(reply.pack())
            else:
                socket.send_fds(self._control, [reply.pack()], [data_sock.fileno()])
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _reply(self, request: Request, **fields: Any) -> Reply:
        return Reply(request.seq, request.op, self._fsm, **fields)

    def _set_state(self, request: Request) -> tuple[Reply, socket.socket | None]:
        """Walk the combination path arc by arc, like a driver's set_state loop."""
        try:
            new = VfioState(request.arg)
        except ValueError:
            return self._reply(request, errno=errno.EINVAL,
                               detail=f"unknown state {request.arg}"), None
        try:
            path = next_path(self._fsm, new, self._config.flags)
        except InvalidTransition as exc:
            return self._reply(request, errno=exc.errno, detail=exc.strerror), None
        data_sock = None
        for nxt in path[1:]:
            try:
                data_sock = self._take_arc(nxt)  # only a path's last arc can open a session
            except StreamRejected as exc:
                # The uAPI lets a failed arc leave the device in ERROR; only RESET recovers.
                self._end_session()
                self._fsm = VfioState.ERROR
                return self._reply(request, errno=errno.EINVAL, detail=str(exc)), None
            self._fsm = nxt
        return self._reply(request), data_sock

    def _take_arc(self, dst: VfioState) -> socket.socket | None:
        """Do what the arc ``self._fsm -> dst`` does; the client's end of a new session."""
        effect = session_effect(self._fsm, dst)
        if effect.opens:
            return self._open_session(save=effect is Session.OPEN_SAVE,
                                      precopy=dst in PRECOPY_STATES)
        if effect is Session.KEEP and dst is VfioState.STOP_COPY:
            assert isinstance(self._session, SaveSession)
            self._session.enter_stop_copy()
        elif effect is Session.END_RESUME:
            self._finish_resume()
        if effect.ends:
            self._end_session()
        return None

    def _open_session(self, *, save: bool, precopy: bool) -> socket.socket:
        assert self._session is None  # every arc into an opening state ended the last one
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            tune_for_bulk(end)
        ours.setblocking(False)
        now = time.monotonic()
        config = self._config
        gc.disable()  # a session streams at GB/s: no collection pauses until it ends
        self._session = (
            SaveSession(self._state, ours, config.read_bandwidth, precopy=precopy, now=now)
            if save else ResumeSession(self._state, ours, config.write_bandwidth, now))
        return theirs

    def _finish_resume(self) -> None:
        assert isinstance(self._session, ResumeSession)
        content, generations, digest = self._session.finish()
        time.sleep(self._config.firmware_latency_ms / 1000)  # the firmware digesting it
        self._state.adopt(content, generations, digest)

    def _end_session(self) -> None:
        if self._watching is not None:
            self._selector.unregister(self._watching[0])
            self._watching = None
        if self._session is not None:
            self._session.close()
            self._session = None
            gc.enable()

    def _get_state(self, request: Request) -> tuple[Reply, None]:
        return self._reply(request), None

    def _get_data_size(self, request: Request) -> tuple[Reply, None]:
        size = (self._session.remaining_bytes() if isinstance(self._session, SaveSession)
                else stream_bytes(self._state.size))
        return self._reply(request, data_size=size), None

    def _get_precopy_info(self, request: Request) -> tuple[Reply, None]:
        if self._fsm not in PRECOPY_STATES:
            return self._reply(request, errno=errno.EINVAL,
                               detail=f"no precopy info in {self._fsm.name}"), None
        assert isinstance(self._session, SaveSession)
        info = self._session.precopy_info()
        return self._reply(request, initial_bytes=info.initial_bytes,
                           dirty_bytes=info.dirty_bytes), None

    def _get_digest(self, request: Request) -> tuple[Reply, None]:
        return self._reply(request, digest=self._state.digest()), None

    def _reset(self, request: Request) -> tuple[Reply, None]:
        # The state stays the last valid one: a failed load never adopted anything.
        self._end_session()
        self._fsm = VfioState.RUNNING
        return self._reply(request), None


def _die_with_owner(owner_pid: int) -> None:
    """Get SIGKILL when the owner dies, however it dies; exit if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != owner_pid:  # it died before prctl: no signal will come
        raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a device-model process."""
    parser = argparse.ArgumentParser(prog="python -m devstate.devices.vfio_model")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--config", required=True, help="ModelConfig as JSON")
    args = parser.parse_args(argv)
    config = ModelConfig.from_json(args.config)
    _die_with_owner(config.owner_pid)
    # The model stands for the device's own hardware, not for its owner's work: do not
    # inherit the owner worker's CPU pinning (the kernel keeps this within our cpuset).
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    # Ctrl-C belongs to the coordinator; the model ends with its owner (QUIT, EOF, SIGKILL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with socket.socket(fileno=args.control_fd) as control:
        try:
            model = DeviceModel(config, control)
            gc.freeze()  # what exists now lives as long as the model: keep it out of GC walks
            model.run()
        except ProtocolViolation as exc:
            print(f"vfio_model {config.name}: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
