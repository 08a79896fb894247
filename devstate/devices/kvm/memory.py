"""``guest-ram``: one range of the guest's RAM as a stream of extents, read from and written
into the guest's memfd in place.

Runs in: whichever worker owns the range. Guest RAM is memory, not a KVM handle: every
worker maps the memfd its coordinator passed it (:meth:`DeviceHost.attach_ram`), so the
ranges spread over the whole pool and its channels while only the VM's owner drives the
vCPUs. The owner never copies RAM.

The stream is a sequence of *extents*, each a header then its bytes::

    offset u64 (from the range's start) | length u32 | reserved u32 | length bytes

A stop-and-copy sends the whole range as extents of whatever fits a packet; a precopy
round sends the pages the guest dirtied as extents of their own, and a later extent of the
same pages overwrites an earlier one, so the destination writes each one where it belongs
as it arrives, whatever the packets' segmentation. The packets carry the checksums and
the END digest; the continuity check proves the guest took its RAM.
"""

from __future__ import annotations

import struct

import xxhash

from devstate.config.spec import DeviceSpec
from devstate.devices.base import StreamDevice
from devstate.devices.host import DeviceHost
from devstate.errors import DeviceError

EXTENT = struct.Struct("<QII")


class RamRange(StreamDevice):
    """``ram/k``: the guest RAM bytes ``[start, start + length)``."""

    def __init__(self, spec: DeviceSpec, machine_seed: int, *, incoming: bool,
                 host: DeviceHost) -> None:
        super().__init__(spec, machine_seed)
        assert spec.ram is not None
        self.start, self.length = spec.ram
        self._host = host
        self._sent = 0          # save: bytes of the range read so far
        self._header = bytearray()  # load: an extent header split over writes
        self._at = 0            # load: where the current extent's next byte goes
        self._left = 0          # load: bytes of the current extent still to come
        self._written = 0       # load: bytes written this session
        self._loaded: bytes | None = None  # load: the range's digest when the load ended

    def _range(self) -> memoryview:
        return self._host.guest_ram().view[self.start:self.start + self.length]

    async def digest(self) -> bytes:
        """xxh3_128 of the range: as its last load left it (the guest resumed since, and
        changes it), else as it is now (a source's stopped guest)."""
        return self._loaded or xxhash.xxh3_128_digest(self._range())

    async def save_begin(self) -> None:
        """Start reading the range from its first byte (the guest is stopped)."""
        self._sent = 0

    async def save_read(self, out: memoryview) -> int:
        """One extent: as much of the rest of the range as fits ``out`` after its header."""
        room = len(out) - EXTENT.size
        left = self.length - self._sent
        if left == 0:
            return 0
        if room <= 0:
            raise DeviceError(self.id, f"a packet of {len(out)} B cannot hold an extent")
        n = min(room, left)
        EXTENT.pack_into(out, 0, self._sent, n, 0)
        out[EXTENT.size:EXTENT.size + n] = self._range()[self._sent:self._sent + n]
        self._sent += n
        return EXTENT.size + n

    async def save_end(self) -> None:
        """Nothing to close: the range stays as the stopped guest left it."""

    async def load_begin(self) -> None:
        """A new load: no extent under way."""
        self._header.clear()
        self._left = self._written = 0
        self._loaded = None

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
                    return
                offset, length, _ = EXTENT.unpack(self._header)
                self._header.clear()
                if length == 0 or offset + length > self.length:
                    raise DeviceError(self.id, f"extent [{offset}, {offset + length}) is "
                                      f"outside the range's {self.length} B")
                self._at, self._left = offset, length
                continue
            n = min(self._left, len(data) - pos)
            ram[self._at:self._at + n] = data[pos:pos + n]
            self._at += n
            self._left -= n
            self._written += n
            pos += n

    async def load_end(self) -> None:
        """The stream ended on an extent boundary and covered the range at least once."""
        if self._left or self._header:
            raise DeviceError(self.id, "the stream ended inside an extent")
        if self._written < self.length:
            raise DeviceError(self.id, f"{self._written} B of the range's {self.length} B "
                              "arrived")
        # Hashed now, before the guest runs on it: the digest the source's is compared
        # with. Part of the downtime (xxh3 reads ~10 GB/s per core), the price of proving
        # every page arrived where it belongs.
        self._loaded = xxhash.xxh3_128_digest(self._range())

    async def reset(self) -> None:
        """Forget a failed load's position; the bytes it wrote stay (the guest is not running
        here, and a next load rewrites the whole range)."""
        await self.load_begin()
