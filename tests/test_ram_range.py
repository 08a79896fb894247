"""A guest RAM range as a stream: extents read from one memfd, written into another in place.

The save side packs the range into packets of any size; the load side takes the stream cut
anywhere (a header split over writes, several extents in one write) and must end with the
destination's range equal to the source's, its digest taken at the end of the load.
Bytes are seeded through numpy, not through the code under test.
"""

from __future__ import annotations

import asyncio
import errno
import os

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from devstate.config.spec import Backend, DeviceSpec, Shape, StreamCost
from devstate.devices.host import DeviceHost
from devstate.devices.kvm.memory import EXTENT, ZERO, RamRange
from devstate.devices.kvm.ram import GuestRam, log_bytes
from devstate.errors import DeviceError

RAM = 2 << 20
PAGE = 4096
START, LENGTH = 256 << 10, 1 << 20  # a range starts on a dirty-log word (64 pages)


def _range(host: DeviceHost, *, incoming: bool = False) -> RamRange:
    spec = DeviceSpec(0, "ram/0", Backend.GUEST_RAM, Shape.STREAM, 1, LENGTH,
                      ram=(START, LENGTH), stream=StreamCost(LENGTH, 1e9))
    return RamRange(spec, 0, incoming=incoming, host=host)


def _host(seed: int | None) -> tuple[DeviceHost, GuestRam]:
    ram = GuestRam.create(RAM, "test-ram")
    if seed is not None:
        np.frombuffer(ram.view, dtype=np.uint8)[:] = \
            np.random.default_rng(seed).integers(0, 256, RAM, dtype=np.uint8)
    host = DeviceHost()
    host.attach_ram(ram.fd, RAM)  # maps a duplicate, as a worker does
    return host, ram


def _save(device: RamRange, packets: list[int]) -> list[bytes]:
    async def go() -> list[bytes]:
        out, i = [], 0
        await device.save_begin()
        while True:
            buf = bytearray(packets[i % len(packets)])
            n = await device.save_read(memoryview(buf))
            if n == 0:
                return out
            out.append(bytes(buf[:n]))
            i += 1
    return asyncio.run(go())


def _load(device: RamRange, stream: bytes, cuts: list[int]) -> None:
    async def go() -> None:
        await device.load_begin()
        at = 0
        for cut in sorted(set(cuts)) + [len(stream)]:
            await device.load_write(memoryview(stream)[at:cut])
            at = cut
        await device.load_end()
    asyncio.run(go())


def _digest(ram: GuestRam) -> bytes:
    """The range's digest computed here: xxh3_128 over each 16 KiB piece's xxh3_128."""
    return xxhash.xxh3_128_digest(b"".join(
        xxhash.xxh3_128_digest(ram.view[at:at + (16 << 10)])
        for at in range(START, START + LENGTH, 16 << 10)))


@settings(max_examples=40, deadline=None)
@given(packets=st.lists(st.integers(EXTENT.size + 1, 40_000), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, LENGTH), max_size=30))
def test_a_range_arrives_whole_and_in_place_whatever_the_cuts(packets: list[int],
                                                              cuts: list[int]) -> None:
    src_host, src = _host(seed=7)
    dst_host, dst = _host(seed=None)
    with src, dst:
        stream = b"".join(_save(_range(src_host), packets))
        loading = _range(dst_host)
        _load(loading, stream, [c for c in cuts if c < len(stream)])
        assert bytes(dst.view[START:START + LENGTH]) == bytes(src.view[START:START + LENGTH])
        # Only the range was written: the rest of the destination's RAM is untouched.
        assert not any(dst.view[:START]) and not any(dst.view[START + LENGTH:])
        expected = _digest(src)
        # The guest runs on after the load: the digest is the one taken at load_end.
        dst.view[START] ^= 0xFF
        assert asyncio.run(loading.digest()) == expected
        src_host.close()
        dst_host.close()


def test_an_extent_outside_the_range_and_a_short_stream_are_refused() -> None:
    host, ram = _host(seed=None)
    with ram:
        device = _range(host)
        outside = EXTENT.pack(LENGTH - 8, 16, 0) + bytes(16)
        with pytest.raises(DeviceError, match="outside the range"):
            _load(device, outside, [])
        short = EXTENT.pack(0, 4096, 0) + bytes(4096)
        with pytest.raises(DeviceError, match=f"4096 B of the range's {LENGTH} B"):
            _load(device, short, [])
        cut = EXTENT.pack(0, 4096, 0) + bytes(100)
        with pytest.raises(DeviceError, match="inside an extent"):
            _load(device, cut, [])
        host.close()


# Pages of the range with one non-zero byte each, at its start, end, middle or second byte.
SPARSE = {3: 0, 4: PAGE - 1, 40: PAGE // 2, 63: 1, 70: 7}


def _allocated(ram: GuestRam) -> int:
    """Bytes of the memfd that hold pages (its holes hold none)."""
    return os.fstat(ram.fd).st_blocks * 512


def _sparse(ram: GuestRam) -> None:
    view = np.frombuffer(ram.view, np.uint8)
    for page, at in SPARSE.items():
        view[START + page * PAGE + at] = page + 1


def test_zero_pages_cross_as_headers_and_clear_what_a_failed_load_left() -> None:
    """A mostly zero range moves as its four data pages and headers for the zero runs; on a
    destination whose failed load left bytes everywhere, the retry's zero runs clear them."""
    src_host, src = _host(seed=None)
    full_host, full = _host(seed=3)
    dst_host, dst = _host(seed=None)
    with src, full, dst:
        _sparse(src)
        holding = _allocated(src)
        stream = b"".join(_save(_range(src_host), [40_000]))
        assert _allocated(src) == holding  # the look read no hole into being
        # Extents: pages 0-2 zero, 3-4, 5-39 zero, 40, 41-62 zero, 63, 64-69 zero, 70,
        # 71-255 zero.
        assert len(stream) == len(SPARSE) * PAGE + 9 * EXTENT.size
        assert EXTENT.unpack_from(stream)[2] == ZERO  # pages 0-2
        loading = _range(dst_host, incoming=True)  # a new memfd: zero
        _load(loading, stream, [])
        # The zero runs stayed holes: the destination holds the five digest pieces (16 KiB,
        # 4 pages each) the five pages fall in, read whole to hash them; the source's digest
        # reads the same five (checked before this test's own reads fault everything in).
        pieces = log_bytes(RAM) + 5 * (16 << 10)
        assert _allocated(dst) == pieces
        source_digest = asyncio.run(_range(src_host).digest())
        assert _allocated(src) == pieces
        assert bytes(dst.view[START:START + LENGTH]) == bytes(src.view[START:START + LENGTH])
        # Its zero pieces digested unread, the others read: the source's whole digest.
        assert asyncio.run(loading.digest()) == _digest(src) == source_digest
        # Another destination: its first load writes every page, then fails short.
        dst_host2, dst2 = _host(seed=None)
        with dst2:
            retried = _range(dst_host2, incoming=True)
            whole = b"".join(_save(_range(full_host), [40_000]))
            with pytest.raises(DeviceError, match="inside an extent"):
                _load(retried, whole[:-1], [])
            asyncio.run(retried.reset())
            assert any(dst2.view[START:START + LENGTH])
            # Cut after page 70: its piece (pages 64-127) is hashed, then the last zero run
            # clears the rest of it (what the failed load left), and it is hashed again.
            _load(retried, stream, [7, 5000, len(stream) - EXTENT.size])
            assert bytes(dst2.view[START:START + LENGTH]) == \
                bytes(src.view[START:START + LENGTH])
            assert asyncio.run(retried.digest()) == _digest(src)
            dst_host2.close()
        src_host.close()
        full_host.close()
        dst_host.close()


def test_a_zero_page_the_guest_writes_after_the_look_is_sent_again_with_its_bytes() -> None:
    """Round 1 looks at every page; the guest then writes one it found zero (and the
    owner's sync logs it): that round still sends it as zero, the next sends its bytes."""
    src_host, src = _host(seed=None)
    dst_host, dst = _host(seed=None)
    page = START // PAGE + 10

    async def rounds(saving: RamRange) -> bytes:
        async def drain() -> bytes:
            out = b""
            while True:
                buf = bytearray(40_000)
                try:
                    n = await saving.precopy_read(memoryview(buf))
                except OSError as exc:
                    assert exc.errno == errno.ENOMSG
                    return out
                out += buf[:n]
        await saving.precopy_begin()
        src.view[page * PAGE + 5] = 0xAB  # the guest writes...
        src.dirty[page // 64] |= np.uint64(1 << (page % 64))  # ...the owner's sync logs it
        first = await drain()
        assert await saving.precopy_remaining() == PAGE
        return first + await drain()

    with src, dst:
        stream = asyncio.run(rounds(_range(src_host)))
        _load(_range(dst_host, incoming=True), stream, [])
        assert dst.view[page * PAGE + 5] == 0xAB
        assert bytes(dst.view[START:START + LENGTH]) == bytes(src.view[START:START + LENGTH])
        src_host.close()
        dst_host.close()


def test_the_pages_sent_with_their_bytes_are_told_to_the_shared_log() -> None:
    """Round 1 sends two pages with bytes and the rest of the range as zero headers: asked
    what is left, the range marks those two pages sent (the destination holds them) and no
    other, in the RAM's shared log; a new precopy forgets them."""
    host, ram = _host(seed=None)
    first = START // PAGE
    with ram:
        for page in (first + 3, first + 200):
            ram.view[page * PAGE + 7] = 0x5A  # the guest wrote these two

        async def round_one(saving: RamRange) -> None:
            await saving.precopy_begin()
            while True:
                try:
                    await saving.precopy_read(memoryview(bytearray(40_000)))
                except OSError as exc:
                    assert exc.errno == errno.ENOMSG
                    break
            await saving.precopy_remaining()

        saving = _range(host)
        asyncio.run(round_one(saving))
        sent = np.unpackbits(ram.sent.view(np.uint8), bitorder="little")
        assert list(np.flatnonzero(sent)) == [first + 3, first + 200]
        asyncio.run(saving.precopy_begin())
        assert not ram.sent.any()
        host.close()


def test_an_extent_with_unknown_flags_is_refused() -> None:
    host, ram = _host(seed=None)
    with ram:
        with pytest.raises(DeviceError, match="flags 0x2: unknown"):
            _load(_range(host, incoming=True), EXTENT.pack(0, LENGTH, 2), [])
        host.close()


def test_a_page_a_later_extent_rewrites_is_in_the_digest() -> None:
    """Pieces are hashed as the load writes them; one rewritten by a later extent of the
    same load (a later round) is hashed again: the digest is of the bytes the load ended
    with, as the source's whole hash of its RAM is."""
    src_host, src = _host(seed=5)
    dst_host, dst = _host(seed=None)
    with src, dst:
        loading = _range(dst_host, incoming=True)
        first = b"".join(_save(_range(src_host), [70_000]))
        src.view[START + 5 * PAGE:START + 6 * PAGE] = bytes(range(256)) * (PAGE // 256)
        later = EXTENT.pack(5 * PAGE, PAGE, 0) + bytes(src.view[START + 5 * PAGE:
                                                                 START + 6 * PAGE])
        _load(loading, first + later, [70_000, len(first) + 3])
        assert asyncio.run(loading.digest()) == _digest(src)
        assert asyncio.run(_range(src_host).digest()) == _digest(src)
        src_host.close()
        dst_host.close()


def test_a_destination_that_migrates_on_digests_its_ram_as_it_is_then() -> None:
    """A range loaded here, then written by the guest that resumed on it, then saved to a
    next destination: its digest is of the RAM as it is at that save, not as the load
    left it."""
    src_host, src = _host(seed=7)
    dst_host, dst = _host(seed=None)
    with src, dst:
        here = _range(dst_host, incoming=True)
        _load(here, b"".join(_save(_range(src_host), [40_000])), [])
        assert asyncio.run(here.digest()) == _digest(src)
        view = np.frombuffer(dst.view, dtype=np.uint8)
        view[START + 5] ^= 0xFF  # the guest runs on and writes
        _save(here, [40_000])  # then migrates on
        assert asyncio.run(here.digest()) == _digest(dst) != _digest(src)
