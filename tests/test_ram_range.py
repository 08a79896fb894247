"""A guest RAM range as a stream: extents read from one memfd, written into another in place.

The save side packs the range into packets of any size; the load side takes the stream cut
anywhere (a header split over writes, several extents in one write) and must end with the
destination's range equal to the source's, its digest taken at the end of the load.
Bytes are seeded through numpy, not through the code under test.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from devstate.config.spec import Backend, DeviceSpec, Shape, StreamCost
from devstate.devices.host import DeviceHost
from devstate.devices.kvm.memory import EXTENT, RamRange
from devstate.devices.kvm.ram import GuestRam
from devstate.errors import DeviceError

RAM = 1 << 20
START, LENGTH = 64 << 10, 256 << 10


def _range(host: DeviceHost) -> RamRange:
    spec = DeviceSpec(0, "ram/0", Backend.GUEST_RAM, Shape.STREAM, 1, LENGTH,
                      ram=(START, LENGTH), stream=StreamCost(LENGTH, 1e9))
    return RamRange(spec, 0, incoming=False, host=host)


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
        expected = xxhash.xxh3_128_digest(src.view[START:START + LENGTH])
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
