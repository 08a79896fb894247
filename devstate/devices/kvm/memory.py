"""``guest-ram``: one range of the guest's RAM as a stream of extents, read from and written
into the guest's memfd in place.

Runs in: whichever worker owns the range. Guest RAM is memory, not a KVM handle: every
worker maps the memfd its coordinator passed it (:meth:`DeviceHost.attach_ram`), so the
ranges spread over the whole pool and its channels while only the VM's owner drives the
vCPUs. The owner never copies RAM.

The stream is a sequence of *extents*, each a header then its bytes::

    offset u64 (from the range's start) | length u32 | flags u32 | length bytes

or, with the ZERO flag, the header alone: those ``length`` bytes are zero (QEMU's zero
page). A send of every page (the first round, or a stop-and-copy without precopy) looks at
every page first and sends a run of zero pages as one such header: a guest's untouched
RAM costs a scan (~14 GB/s per core), not a copy through both sides and the link. The
later rounds send what the guest just wrote, as it is. The destination makes a ZERO
extent's bytes zero only where a load wrote before (its RAM starts zeroed: a memfd).

Without precopy, stop-and-copy sends the whole range as extents of whatever fits a packet.
With precopy (a live migration, :mod:`devstate.migration.dirty`), the guest runs meanwhile:
the first round sends every page, each later round the pages the guest dirtied since the
one before (taken from the dirty log, :func:`~devstate.devices.kvm.dirty.take`), and
stop-and-copy only what was dirtied last. A later extent of the same pages overwrites an
earlier one, so the destination writes each one where it belongs as it arrives, whatever
the packets' segmentation. The packets carry the checksums and the END digest; the
range's *digest* is compared after the move (every page, however many times it moved),
and the continuity check proves the guest took its RAM.

The digest is xxh3_128 over the xxh3_128 of each piece of :data:`PIECE_BYTES` in turn, so
the destination can hash a piece as soon as a load has written it and only rehash what a
later extent rewrites: at the stop it hashes the pieces of the last round's pages, not the
whole range (a GiB read in the downtime, ~35-50 ms on this host, most of it the pages the
guest did not touch). It still covers every byte as it was when last written; a page lost
by the dirty log, or written to the wrong place, leaves a piece that differs from the
source's, which hashes its stopped RAM whole (after the resume, off the downtime).
"""

from __future__ import annotations

import errno
import struct

import numpy as np
import numpy.typing as npt
import xxhash

from devstate.config.spec import DeviceSpec
from devstate.devices.base import DIGEST_BYTES, StreamDevice
from devstate.devices.host import DeviceHost
from devstate.devices.kvm import dirty
from devstate.devices.kvm.ram import PAGE_BYTES, data_pages
from devstate.errors import DeviceError

EXTENT = struct.Struct("<QII")
# The digest's pieces: 4 pages. A run of pages the guest dirtied in the last round costs
# the stop a rehash of every piece it touches on the destination, whole: with 64-page
# pieces each run's two ends added up to 2 x 256 KiB (288 vCPUs, each dirtying one run a
# round: up to 144 MiB read and hashed in the downtime); with 4 pages, 2 x 16 KiB. Smaller
# pieces cost more when a range is hashed whole (one call per piece: a GiB in ~83 ms
# against ~46 ms here), which is off the downtime: on the destination during precopy, on
# the source after the resume.
PIECE_BYTES = 4 * PAGE_BYTES
_ZERO_PIECE = np.void(xxhash.xxh3_128_digest(bytes(PIECE_BYTES)))
ZERO = 1  # extent flag: the bytes are zero, and none follow the header
# A run of pending pages is looked for at most this far ahead: a run may end anywhere (the
# next continues it), and the look costs what it covers.
RUN_LOOK_PAGES = 1024


class RamRange(StreamDevice):
    """``ram/k``: the guest RAM bytes ``[start, start + length)``."""

    supports_precopy = True

    def __init__(self, spec: DeviceSpec, machine_seed: int, *, incoming: bool,
                 host: DeviceHost) -> None:
        super().__init__(spec, machine_seed)
        assert spec.ram is not None
        self.start, self.length = spec.ram
        self._host = host
        # save: the pages still to send (every page at first, then those taken from the
        # dirty log), and the page to look from next; None: no save session.
        self._pending: npt.NDArray[np.bool_] | None = None
        # save: the pages that were zero when a send of every page began (None: that
        # send is over); a page the guest dirtied since is taken off.
        self._zero: npt.NDArray[np.bool_] | None = None
        # save: the pages whose bytes crossed in this save, told to the RAM's shared log
        # of sent pages when the coordinator asks what is left (dirty.mark_sent).
        self._sent: npt.NDArray[np.bool_] | None = None
        self._cursor = 0
        self._run_at = self._run_left = 0  # save: the run of pages being sent (bytes)
        self._run_zero = False              # save: whether that run is of zero pages
        # load: the pages a load may have left non-zero (the rest are zero, as a new
        # memfd is): a destination's until its first load ends, then all (the guest runs).
        self._stale = np.full(self.length // PAGE_BYTES, not incoming)
        self._header = bytearray()  # load: an extent header split over writes
        self._at = 0            # load: where the current extent's next byte goes
        self._left = 0          # load: bytes of the current extent still to come
        self._written = 0       # load: bytes written this session
        self._loaded: bytes | None = None  # load: the range's digest when the load ended
        # Each piece's digest as last hashed (a load's, or a source's whole digest), and for
        # a load the pieces to hash again before the digest (``_unhashed``) and, of those,
        # the ones written since (``_rewritten``: hashed as soon as no extent in progress
        # still writes them).
        pieces = -(-self.length // PIECE_BYTES)
        self._pieces = bytearray(DIGEST_BYTES * pieces)
        # The same bytes a digest per item, to set many pieces at once (a slice of the
        # bytearray is the faster way to set one: ~0.3 against ~0.5 µs, in the downtime).
        self._each_piece = np.frombuffer(self._pieces, dtype=(np.void, DIGEST_BYTES))
        self._unhashed = np.ones(pieces, dtype=bool)
        self._rewritten = np.zeros(pieces, dtype=bool)

    def _range(self) -> memoryview:
        return self._host.guest_ram().view[self.start:self.start + self.length]

    async def digest(self) -> bytes:
        """The range's digest (the module's docstring): as its last load left it (the guest
        resumed since, and changes it), else as it is now (a source's stopped guest: every
        piece hashed, but a hole of the memfd, zero and unread, since reading would fault
        it in)."""
        if self._loaded is not None:
            return self._loaded
        data = data_pages(self._host.guest_ram(), self.start, self.length)
        holds = np.logical_or.reduceat(data, np.arange(0, data.size, PIECE_BYTES // PAGE_BYTES))
        if self.length % PIECE_BYTES:
            holds[-1] = True  # a short last piece is hashed: the zero piece's is a whole one's
        self._known_zero(np.flatnonzero(~holds))
        self._hash(self._range(), holds)
        return xxhash.xxh3_128_digest(self._pieces)

    async def precopy_begin(self) -> None:
        """The first round: every page (the owner logs what the guest writes from now)."""
        self._every_page()

    def _every_page(self) -> None:
        self._loaded = None  # a save begins: the range is the guest's now, not a load's
        self._pending = np.ones(self.length // PAGE_BYTES, dtype=bool)
        self._sent = np.zeros(self.length // PAGE_BYTES, dtype=bool)
        dirty.forget_sent(self._host.guest_ram(), self.start, self.length)
        # Holes are zero unread; the pages with data are looked at (runs of them at a time,
        # so a mostly empty range costs little).
        data = data_pages(self._host.guest_ram(), self.start, self.length)
        self._zero = np.logical_not(data)
        words = np.frombuffer(self._range(), np.uint64).reshape(-1, PAGE_BYTES // 8)
        for first, count in _runs(data):
            self._zero[first:first + count] = np.logical_not(
                words[first:first + count].any(axis=1))
        self._cursor = self._run_at = self._run_left = 0

    async def precopy_read(self, out: memoryview) -> int:
        """Extents of the pending pages that fit ``out``; ``OSError(ENOMSG)`` when this
        round's are all read (the next round's come when the owner syncs the log)."""
        n = self._read_pending(out)
        if n == 0:
            raise OSError(errno.ENOMSG, "no dirty pages for now")
        return n

    async def precopy_remaining(self) -> int:
        """Bytes of the pages still to send, after taking those the log has gained; the
        pages sent so far go to the shared log of sent pages, for the owner's next sync."""
        assert self._pending is not None and self._sent is not None
        dirty.mark_sent(self._host.guest_ram(), self.start, self._sent)
        self._take()
        return int(np.count_nonzero(self._pending)) * PAGE_BYTES + self._run_left

    def _take(self) -> None:
        """Add the pages the dirty log holds for this range; look from the first page again
        (the new ones may lie behind the cursor)."""
        assert self._pending is not None
        taken = dirty.take(self._host.guest_ram(), self.start, self.length)
        self._pending |= taken
        if self._zero is not None:
            self._zero &= ~taken  # written since the look: sent as it is now
        self._cursor = 0

    async def save_begin(self) -> None:
        """Stop-and-copy (the guest is stopped): after a precopy, the pages still pending
        and those of the last round (synced at the stop); else every page."""
        if self._pending is None:
            self._every_page()
        else:
            self._take()
        # Nobody asks what is left after the stop: its sends need no marking (the
        # downtime's extents would each pay a numpy store for nothing).
        self._sent = None

    async def save_read(self, out: memoryview) -> int:
        """Extents of the pending pages that fit ``out`` (0 also when the rest of ``out``
        cannot hold an extent: the next packet takes it)."""
        return self._read_pending(out)

    def _read_pending(self, out: memoryview) -> int:
        """Extents of pending pages into ``out``, filling it but for at most a header's
        bytes: a run of pending pages goes out whole, in as many extents (cut anywhere,
        pages too) as the packets it takes. 0: nothing pending (or no room for a byte)."""
        ram, filled = self._range(), 0
        while len(out) - filled > EXTENT.size:
            if self._run_left == 0 and not self._next_run():
                break
            if self._run_zero:
                EXTENT.pack_into(out, filled, self._run_at, self._run_left, ZERO)
                filled += EXTENT.size
                self._run_at += self._run_left
                self._run_left = 0
                continue
            n = min(self._run_left, len(out) - filled - EXTENT.size)
            at = self._run_at
            if self._sent is not None:
                self._sent[at // PAGE_BYTES:-(-(at + n) // PAGE_BYTES)] = True
            EXTENT.pack_into(out, filled, at, n, 0)
            out[filled + EXTENT.size:filled + EXTENT.size + n] = ram[at:at + n]
            filled += EXTENT.size + n
            self._run_at += n
            self._run_left -= n
        return filled

    def _next_run(self) -> bool:
        """Start sending the next run of pending pages from the cursor, all zero or none
        (they are pending no more: a page the guest dirties again is taken again and sent
        again, later); False: none pending."""
        pending = self._pending
        assert pending is not None
        found = np.flatnonzero(pending[self._cursor:])
        if found.size == 0:
            return False
        first = self._cursor + int(found[0])
        look = slice(first, min(first + RUN_LOOK_PAGES, pending.size))
        same = pending[look]
        self._run_zero = self._zero is not None and bool(self._zero[first])
        if self._zero is not None:
            same = same & (self._zero[look] == self._run_zero)
        ends = np.flatnonzero(~same)
        count = int(ends[0]) if ends.size else same.size
        pending[first:first + count] = False
        self._run_at, self._run_left = first * PAGE_BYTES, count * PAGE_BYTES
        self._cursor = first + count
        return True

    async def save_end(self) -> None:
        """The session is over (the range stays as the stopped guest left it): the next save
        is a whole one unless it begins with a precopy."""
        self._pending = self._zero = self._sent = None
        self._run_left = 0

    async def load_begin(self) -> None:
        """A new load: no extent under way."""
        self._header.clear()
        self._left = self._written = 0
        self._loaded = None
        self._unhashed[:] = True
        self._rewritten[:] = False

    async def load_write(self, data: memoryview) -> None:
        """Write the extents in ``data`` (any segmentation) where they belong in the range."""
        ram = self._range()
        pos = 0
        while pos < len(data):
            if self._left == 0:
                take = min(EXTENT.size - len(self._header), len(data) - pos)
                self._header += data[pos:pos + take]
                pos += take
                if len(self._header) < EXTENT.size:
                    break  # the rest of the header comes with the next write
                offset, length, flags = EXTENT.unpack(self._header)
                self._header.clear()
                if length == 0 or offset + length > self.length:
                    raise DeviceError(self.id, f"extent [{offset}, {offset + length}) is "
                                      f"outside the range's {self.length} B")
                if flags & ~ZERO:
                    raise DeviceError(self.id, f"extent flags {flags:#x}: unknown")
                if flags & ZERO:
                    self._zero_fill(ram, offset, length)
                    self._written += length
                else:
                    self._at, self._left = offset, length
                continue
            n = min(self._left, len(data) - pos)
            ram[self._at:self._at + n] = data[pos:pos + n]
            self._stale[self._at // PAGE_BYTES:-(-(self._at + n) // PAGE_BYTES)] = True
            self._mark(self._at, n)
            self._at += n
            self._left -= n
            self._written += n
            pos += n
        self._hash_written(ram)

    def _mark(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset + length)`` were written: their pieces need hashing."""
        pieces = slice(offset // PIECE_BYTES, -(-(offset + length) // PIECE_BYTES))
        self._rewritten[pieces] = True
        self._unhashed[pieces] = True

    def _hash_written(self, ram: memoryview) -> None:
        """Hash the pieces written since their last hash that no extent in progress still
        writes (a piece rewritten later is hashed again then)."""
        done = self._rewritten.copy()
        if self._left:
            done[self._at // PIECE_BYTES:-(-(self._at + self._left) // PIECE_BYTES)] = False
        self._hash(ram, done)

    def _hash(self, ram: memoryview, which: npt.NDArray[np.bool_]) -> None:
        """Hash the pieces ``which`` selects (their marks cleared)."""
        chosen = np.flatnonzero(which)
        for k in chosen.tolist():
            self._pieces[k * DIGEST_BYTES:(k + 1) * DIGEST_BYTES] = xxhash.xxh3_128_digest(
                ram[k * PIECE_BYTES:(k + 1) * PIECE_BYTES])
        self._rewritten[chosen] = self._unhashed[chosen] = False

    def _known_zero(self, which: slice | npt.NDArray[np.intp]) -> None:
        """The pieces ``which`` selects are zero: their digest is the zero piece's, unread."""
        self._each_piece[which] = _ZERO_PIECE
        self._rewritten[which] = self._unhashed[which] = False

    def _zero_fill(self, ram: memoryview, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` zero: written only if a load may have left
        bytes there. A piece it covers whole has the zero piece's digest, unread (a GiB of
        zero runs is ~1 KiB on the wire: reading it would put the destination far behind
        the source); a piece it covers in part is hashed as written bytes are."""
        pages = slice(offset // PAGE_BYTES, -(-(offset + length) // PAGE_BYTES))
        if self._stale[pages].any():
            np.frombuffer(ram[offset:offset + length], np.uint8)[:] = 0
            self._stale[-(-offset // PAGE_BYTES):(offset + length) // PAGE_BYTES] = False
        whole = range(-(-offset // PIECE_BYTES), (offset + length) // PIECE_BYTES)
        self._known_zero(slice(whole.start, whole.stop))
        for part in {offset // PIECE_BYTES, (offset + length - 1) // PIECE_BYTES} - set(whole):
            self._mark(part * PIECE_BYTES, 1)

    async def load_end(self) -> None:
        """The stream ended on an extent boundary and covered the range at least once."""
        if self._left or self._header:
            raise DeviceError(self.id, "the stream ended inside an extent")
        if self._written < self.length:
            raise DeviceError(self.id, f"{self._written} B of the range's {self.length} B "
                              "arrived")
        # Digested now, before the guest runs on it: the digest the source's is compared
        # with. In the downtime: only the pieces not hashed since last written (those of
        # the stop-copy's last packets, or of the whole range if nothing was precopied).
        self._hash(self._range(), self._unhashed)
        self._loaded = xxhash.xxh3_128_digest(self._pieces)
        self._stale[:] = True  # the guest runs on it from now

    async def reset(self) -> None:
        """Forget a failed load's position; the bytes it wrote stay (the guest is not running
        here; a next load rewrites the range, and its ZERO extents clear what this one left
        where it sends none); a source forgets its precopy."""
        self._pending = self._zero = None
        await self.load_begin()


def _runs(pages: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(first, count) of each run of True in ``pages``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], pages.view(np.int8), [0]))))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
