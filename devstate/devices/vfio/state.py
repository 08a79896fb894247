"""The ``vfio-sim`` device's state, its digest, and the stream format it saves and loads.

Runs in: the device-model process (and tests). Pure data and arithmetic: no I/O.

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

import enum
import struct

import numpy as np
import xxhash

CHUNK_BYTES = 1 << 20
# The generation of a chunk that holds zero bytes: an incoming device before its load.
BLANK_GENERATION = 0xFFFF_FFFF
CHUNK_WORDS = CHUNK_BYTES // 8
_MASK64 = (1 << 64) - 1

MAGIC = b"DSVFIOST"
FORMAT_VERSION = 1


class Record(enum.IntEnum):
    """The kind word that starts every record of the stream."""

    HEADER = 1
    CHUNK = 2
    END = 3


RECORD_KIND = struct.Struct("<I")
RECORD_BODY: dict[Record, struct.Struct] = {
    Record.HEADER: struct.Struct("<8sIQQIQ"),  # magic, format, seed, size, chunk_bytes, name
    Record.CHUNK: struct.Struct("<QII"),  # index, generation, length (bytes follow)
    Record.END: struct.Struct("<Q16s"),  # chunk count, digest
}

def chunk_count(size: int) -> int:
    """Chunks of a ``size``-byte state: all of CHUNK_BYTES but a partial last one."""
    return -(-size // CHUNK_BYTES)


def stream_bytes(size: int) -> int:
    """Length of a full save stream (header, every chunk once, end) of a ``size``-byte state."""
    chunks = chunk_count(size)
    return (RECORD_KIND.size * (chunks + 2) + RECORD_BODY[Record.HEADER].size
            + RECORD_BODY[Record.END].size
            + chunks * RECORD_BODY[Record.CHUNK].size + size)


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
        """:func:`chunk_hash_of` of the chunk, with the body's hash computed once per length."""
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


def chunk_hash_of(data: memoryview) -> int:
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
        hasher.update(chunk_hash_of(view[start:start + CHUNK_BYTES]).to_bytes(8, "little"))
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
        """Account for chunk ``index`` by its :func:`chunk_hash_of`."""
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


def pack_record(kind: Record, *fields: object) -> memoryview:
    return memoryview(RECORD_KIND.pack(kind) + RECORD_BODY[kind].pack(*fields))
