"""The destination's receive path against any segmentation of the byte stream.

A Loader reassembles packets from whatever pieces the socket delivers: small packets
batched in its window (moved forward when one straddles the end), chunk payloads read
straight into slots, chunk heads that arrived with earlier small packets copied once.
Hypothesis picks the device mix and the cut points; every device must get exactly its
bytes, in order.
"""

from __future__ import annotations

import asyncio
import socket

import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstate import wire
from devstate.arena import Arena, Layout, SlotClass
from devstate.devices.base import RecordDevice, StreamDevice
from devstate.load import Loader
from devstate.spec import Backend, DeviceSpec, Shape

HDR = wire.PACKET_HEADER_BYTES
CHUNK = 4096


class FakeRecord(RecordDevice):
    """Keeps what was put."""

    def __init__(self, index: int) -> None:
        super().__init__(DeviceSpec(index, f"cpu/{index}", Backend.SIM_VCPU, Shape.RECORD,
                                    1, 1024), 0)
        self.loaded = b""

    async def digest(self) -> bytes:
        return self.loaded

    def get(self, out: memoryview) -> int:
        raise NotImplementedError

    def put(self, data: memoryview) -> None:
        self.loaded = bytes(data)


class FakeStream(StreamDevice):
    """Appends what was written; counts the completions."""

    def __init__(self, index: int) -> None:
        super().__init__(DeviceSpec(index, f"vfio/s{index}", Backend.VFIO_SIM, Shape.STREAM,
                                    1, 1 << 20), 0)
        self.loaded = bytearray()
        self.ends = 0

    async def digest(self) -> bytes:
        return bytes(self.loaded)

    async def save_begin(self) -> None: ...
    async def save_read(self, out: memoryview) -> int: return 0
    async def save_end(self) -> None: ...
    async def load_begin(self) -> None: ...
    async def reset(self) -> None: ...

    async def load_write(self, data: memoryview) -> None:
        self.loaded += data

    async def load_end(self) -> None:
        self.ends += 1


def _packet(kind: wire.PacketKind, device: int, seq: int,
            payload: bytes) -> tuple[bytes, int]:
    """A packet's bytes and its checksum."""
    buf = bytearray(HDR + len(payload))
    view = memoryview(buf)
    view[HDR:] = payload
    checksum = wire.pack_packet_header(view, kind, device, seq, view[HDR:])
    return bytes(buf), checksum


def _stream_of(records: list[bytes], streams: list[list[bytes]]) -> bytes:
    """Records first, then the streams' chunks interleaved round robin, then their ENDs."""
    out = []
    for i, payload in enumerate(records):
        out.append(_packet(wire.PacketKind.RECORD, i, 0, payload)[0])
    digests = [wire.StateDigest() for _ in streams]
    for step in range(max((len(c) for c in streams), default=0)):
        for k, chunks in enumerate(streams):
            if step < len(chunks):
                packet, checksum = _packet(wire.PacketKind.CHUNK, len(records) + k, step,
                                           chunks[step])
                digests[k].add(checksum)
                out.append(packet)
    for k, chunks in enumerate(streams):
        end = wire.pack_end(digests[k].digest(), sum(map(len, chunks)), len(chunks))
        out.append(_packet(wire.PacketKind.END, len(records) + k, len(chunks), end)[0])
    return b"".join(out)


async def _load(data: bytes, cuts: list[int], devices: dict, concurrent: bool) -> None:
    layout = Layout(1, (SlotClass(HDR + 1024, 4), SlotClass(HDR + CHUNK, 3),
                        SlotClass(8192, 1)))
    with Arena.create(layout.total_bytes) as arena:
        slots = arena.slot_pool(layout, 0)
        window = slots.acquire_nowait(2)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            loader = Loader(0, devices, slots, window, ours, table_size=len(devices),
                            record_class=0, chunk_class=1)

            async def send() -> None:
                loop = asyncio.get_running_loop()
                pos = 0
                for cut in [*sorted(set(cuts)), len(data)]:
                    if cut > pos:
                        await loop.run_in_executor(None, theirs.sendall, data[pos:cut])
                        pos = cut

            await asyncio.gather(loader.run(devices, concurrent), send())
        finally:
            ours.close()
            theirs.close()
        del window, slots


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(st.binary(min_size=1, max_size=1000), max_size=12),
       streams=st.lists(st.lists(st.binary(min_size=1, max_size=CHUNK), min_size=1,
                                 max_size=5), min_size=0, max_size=3),
       data=st.data(), concurrent=st.booleans())
def test_every_segmentation_loads_every_device_exactly(records, streams, data,
                                                       concurrent) -> None:
    if not records and not streams:
        return
    stream = _stream_of(records, streams)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    devices = {i: FakeRecord(i) for i in range(len(records))}
    devices.update({len(records) + k: FakeStream(len(records) + k)
                    for k in range(len(streams))})
    uvloop.run(_load(stream, cuts, devices, concurrent))
    for i, payload in enumerate(records):
        assert devices[i].loaded == payload
    for k, chunks in enumerate(streams):
        device = devices[len(records) + k]
        assert bytes(device.loaded) == b"".join(chunks)
        assert device.ends == 1
