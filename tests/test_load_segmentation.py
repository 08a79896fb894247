"""The destination's receive path against any segmentation and any spread of the bytes.

A Loader reassembles packets from whatever pieces the sockets deliver: small packets
batched in its windows (moved forward when one straddles the end), chunk payloads read
straight into slots, chunk heads that arrived with earlier small packets copied once, and
(spread routing) a stream's packets arriving over several channels in any interleaving.
Hypothesis picks the device mix, each packet's channel and the cut points; every device
must get exactly its bytes, in order, with fewer chunk slots than a stream has chunks.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstate.arena.slots import Arena, Layout, SlotClass
from devstate.config.spec import Backend, DeviceSpec, Shape
from devstate.devices.base import RecordDevice, StreamDevice
from devstate.errors import IntegrityError, ProtocolError
from devstate.protocol import wire
from devstate.worker.holdings import Holdings
from devstate.worker.load import Loader

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


def _packets_of(records: list[bytes], streams: list[list[bytes]],
                groups: list[int] = ()) -> list[tuple[int, bytes]]:
    """(device, packet) in send order: records (RECORD packets, or RECORDS of the sizes in
    ``groups``, whose records must be of one length), then the streams' chunks interleaved
    round robin, then their ENDs."""
    out = []
    i = 0
    for size in [*groups, *[1] * (len(records) - sum(groups))]:
        batch = records[i:i + size]
        if size == 1:
            out.append((i, _packet(wire.PacketKind.RECORD, i, 0, batch[0])[0]))
        else:
            # Built here from the wire format's description, not by its packer.
            stride = -(-len(batch[0]) // 8) * 8 + 8
            table = struct.pack(f"<4I{size}I", size, len(batch[0]), stride, 0,
                                *range(i, i + size))
            payload = bytearray(table + bytes(-len(table) % 8) + bytes(size * stride))
            start = len(payload) - size * stride
            for k, record in enumerate(batch):
                payload[start + k * stride:start + k * stride + len(record)] = record
            out.append((i, _packet(wire.PacketKind.RECORDS, i, 0, bytes(payload))[0]))
        i += size
    digests = [wire.StateDigest() for _ in streams]
    for step in range(max((len(c) for c in streams), default=0)):
        for k, chunks in enumerate(streams):
            if step < len(chunks):
                packet, checksum = _packet(wire.PacketKind.CHUNK, len(records) + k, step,
                                           chunks[step])
                digests[k].add(checksum)
                out.append((len(records) + k, packet))
    for k, chunks in enumerate(streams):
        end = wire.pack_end(digests[k].digest(), sum(map(len, chunks)), len(chunks))
        out.append((len(records) + k,
                    _packet(wire.PacketKind.END, len(records) + k, len(chunks), end)[0]))
    return out


def _channel_bytes(packets: list[tuple[int, bytes]], routes: list[int],
                   channels: int) -> list[bytes]:
    """Each channel's byte stream: its packets in send order, then its FIN."""
    per = [[] for _ in range(channels)]
    for (_, packet), k in zip(packets, routes, strict=True):
        per[k].append(packet)
    return [b"".join(p) + _packet(wire.PacketKind.FIN, 0, len(p), b"")[0] for p in per]


async def _load(streams: list[bytes], cuts: list[list[int]], devices: dict,
                concurrent: bool, chunk_slots: int) -> None:
    channels = len(streams)
    failure: ProtocolError | None = None
    layout = Layout(1, (SlotClass(HDR + 1024, 4), SlotClass(HDR + CHUNK, chunk_slots),
                        SlotClass(8192, channels)))
    with Arena.create(layout.total_bytes) as arena:
        slots = arena.slot_pool(layout, 0)
        windows = {k: slots.acquire_nowait(2) for k in range(channels)}
        pairs = [socket.socketpair() for _ in range(channels)]
        for ours, _ in pairs:
            ours.setblocking(False)
        try:
            held = Holdings(0, devices, slots, arena.view(0, layout.total_bytes),
                            {k: ours for k, (ours, _) in enumerate(pairs)}, None,
                            record_class=0, chunk_class=1)
            loader = Loader(held, windows, (0,) * len(devices), 1)

            async def send(k: int) -> None:
                loop = asyncio.get_running_loop()
                data, pos = streams[k], 0
                for cut in [*sorted(set(cuts[k])), len(data)]:
                    if cut > pos:
                        await loop.run_in_executor(None, pairs[k][1].sendall, data[pos:cut])
                        pos = cut

            try:
                await asyncio.gather(loader.run(devices, concurrent),
                                     *(send(k) for k in range(channels)))
            except* ProtocolError as group:
                # Raised once the arena is closed: the failed load's frames hold its views.
                failure = group.exceptions[0].with_traceback(None)
                failure.__context__ = None
                del loader, held, group
                gc.collect()  # the failed load's frames and tasks, in cycles
        finally:
            for pair in pairs:
                for sock in pair:
                    sock.close()
        del windows, slots
    if failure is not None:
        raise failure


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(st.binary(min_size=1, max_size=1000), max_size=12),
       streams=st.lists(st.lists(st.binary(min_size=1, max_size=CHUNK), min_size=1,
                                 max_size=5), min_size=0, max_size=3),
       data=st.data(), concurrent=st.booleans())
def test_every_segmentation_loads_every_device_exactly(records, streams, data,
                                                       concurrent) -> None:
    """One channel: any cut points, in sequential and concurrent mode."""
    _check(records, streams, data, concurrent, channels=1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(st.binary(min_size=1, max_size=1000), max_size=8),
       streams=st.lists(st.lists(st.binary(min_size=1, max_size=CHUNK), min_size=1,
                                 max_size=8), min_size=1, max_size=3),
       channels=st.integers(2, 4), data=st.data())
def test_spread_packets_reassemble_in_order_from_any_channel(records, streams, channels,
                                                            data) -> None:
    """Spread routing: every packet on any channel, the channels read in any interleaving,
    with fewer chunk slots than one stream has chunks: each stream still loads in order."""
    _check(records, streams, data, True, channels=channels)


def _check(records, streams, data, concurrent: bool, *, channels: int) -> None:
    if not records and not streams:
        return
    # Runs of records in one RECORDS packet (a KVM VM's batches), each cut to one length.
    groups = data.draw(st.lists(st.integers(2, 3), max_size=len(records) // 2))
    while sum(groups) > len(records):
        groups.pop()
    records = list(records)
    start = 0
    for size in groups:
        shortest = min(map(len, records[start:start + size]))
        records[start:start + size] = [r[:shortest] for r in records[start:start + size]]
        start += size
    packets = _packets_of(records, streams, groups)
    routes = data.draw(st.lists(st.integers(0, channels - 1), min_size=len(packets),
                                max_size=len(packets)))
    per_channel = _channel_bytes(packets, routes, channels)
    cuts = [data.draw(st.lists(st.integers(0, len(b)), max_size=20)) for b in per_channel]
    devices = {i: FakeRecord(i) for i in range(len(records))}
    devices.update({len(records) + k: FakeStream(len(records) + k)
                    for k in range(len(streams))})
    uvloop.run(_load(per_channel, cuts, devices, concurrent, chunk_slots=channels + 1))
    for i, payload in enumerate(records):
        assert devices[i].loaded == payload
    for k, chunks in enumerate(streams):
        device = devices[len(records) + k]
        assert bytes(device.loaded) == b"".join(chunks)
        assert device.ends == 1


def _one_channel(*packets: bytes, fin_counts: int) -> None:
    """Load two record devices from one channel carrying ``packets`` and a FIN that says
    it counts ``fin_counts`` packets."""
    data = b"".join(packets) + _packet(wire.PacketKind.FIN, 0, fin_counts, b"")[0]
    uvloop.run(_load([data], [[]], {0: FakeRecord(0), 1: FakeRecord(1)}, True,
                     chunk_slots=2))


def test_a_record_that_arrives_twice_is_refused() -> None:
    """A record is its device's whole state, put once: a second one, valid checksum and
    all, is a protocol error naming the device, never a second put."""
    first, second = (_packet(wire.PacketKind.RECORD, i, 0, bytes([i + 1]) * 64)[0]
                     for i in range(2))
    with pytest.raises(ProtocolError, match="cpu/0: packet after its end"):
        _one_channel(first, first, second, fin_counts=3)


def test_a_fin_that_counts_other_packets_than_arrived_is_refused() -> None:
    """Every packet arrived whole and valid, but the FIN counts one more: one was lost on
    the way, and the channel says so."""
    packets = [_packet(wire.PacketKind.RECORD, i, 0, bytes([i + 1]) * 64)[0] for i in range(2)]
    with pytest.raises(IntegrityError, match="fin.packets: channel 0: the source sent 3"):
        _one_channel(*packets, fin_counts=3)
