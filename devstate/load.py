"""The destination side of one worker: receive packets into the arena and put its devices.

Runs in: a destination worker process, on its event loop. The worker owns its devices,
its partition of the arena and its data channel.

Receiving: small packets (records, END markers) arrive batched into the worker's receive
*window*, a slot of the arena, and records are put straight from there (in single-vm mode
each is copied to a record slot of its own first, to be put on a thread). A stream CHUNK's
payload goes to a chunk slot of its own: after a chunk header, the receiver reads only up
to the next header, so payloads land in their slot by ``recv_into`` without a copy (a copy
happens only for payload bytes that shared one read with small packets before them).
When no chunk slot is free the receiver stops reading: the channel fills and the sender
blocks (backpressure, bounded memory).

Order and integrity: every packet's checksum is verified on arrival; each device's packets
must arrive with consecutive sequence numbers (records exactly once); each device's END
digest (over its packets' checksums, in order: :class:`~devstate.wire.StateDigest`) and
byte count must match before the device counts as loaded. Any failure raises, which
cancels every task of the load.

Concurrent mode gives each stream device its own task (chunks queue to it in order), so one
device's slow writes or firmware latency never block another. Sequential mode handles each
packet to completion before reading the next, as VMMs do today.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from devstate import fdio, wire
from devstate.arena import Slot, SlotPool
from devstate.devices.base import Device, RecordDevice, StreamDevice
from devstate.errors import ChannelError, IntegrityError, ProtocolError
from devstate.messages import ResultRow

HDR = wire.PACKET_HEADER_BYTES


@dataclass(slots=True)
class _Incoming:
    """Progress of one device's load."""

    device: Device
    next_seq: int = 0
    bytes: int = 0
    packets: int = 0
    start_ns: int = 0
    end_ns: int = 0
    done_ns: int = 0
    ended: bool = False
    digest: wire.StateDigest = field(default_factory=wire.StateDigest)
    queue: asyncio.Queue[tuple[Slot | None, int, wire.EndOfState | None]] | None = None


class Loader:
    """Receives one worker's channel and loads the devices it owns."""

    def __init__(self, worker: int, devices: dict[int, Device], slots: SlotPool,
                 window: Slot, sock: socket.socket, *, table_size: int,
                 record_class: int, chunk_class: int, executor: Executor | None = None) -> None:
        self.worker = worker
        self._devices = devices
        self._slots = slots
        self._window = window
        self._sock = sock
        self._table_size = table_size
        self._record_class = record_class
        self._chunk_class = chunk_class
        self._executor = executor
        self._puts: list[asyncio.Future[None]] = []  # single-vm puts in flight
        self._max_chunk = slots.sizes[chunk_class] - HDR
        self._max_payload = max(self._max_chunk, window.size - HDR)
        self._loads: dict[int, _Incoming] = {}
        self._concurrent = False
        self._tasks: asyncio.TaskGroup | None = None

    async def run(self, indices: Iterable[int], concurrent: bool) -> list[ResultRow]:
        """Load every device in ``indices``; return once each is put and verified."""
        self._concurrent = concurrent
        self._loads = {i: _Incoming(self._devices[i]) for i in indices}
        async with asyncio.TaskGroup() as tg:
            self._tasks = tg
            await self._receive()
            await asyncio.gather(*self._puts)
        return [(i, s.device.id, s.bytes, s.packets, s.start_ns, s.end_ns, self.worker,
                 s.done_ns) for i, s in self._loads.items()]

    async def _receive(self) -> None:
        buf = self._window.view
        # A small packet must fit in half the window, so moving a partial one to the front
        # always makes room for the rest of it.
        max_small = len(buf) // 2 - HDR
        start = end = 0
        remaining = len(self._loads)
        after_chunk = False
        while remaining:
            while remaining and end - start >= HDR:
                header = wire.decode_packet_header(buf[start:start + HDR],
                                                   devices=self._table_size,
                                                   max_payload=self._max_payload)
                if header.kind is wire.PacketKind.CHUNK:
                    if header.length > self._max_chunk:
                        raise ProtocolError("packet.length", f"a CHUNK of {header.length} B "
                                            f"exceeds the chunk slots' {self._max_chunk} B")
                    have = min(end - start - HDR, header.length)
                    await self._receive_chunk(header, buf[start:start + HDR],
                                              buf[start + HDR:start + HDR + have])
                    start += HDR + have
                    after_chunk = True
                    continue
                if header.length > max_small:
                    raise ProtocolError("packet.length", f"a {header.kind.name} of "
                                        f"{header.length} B exceeds the limit {max_small}")
                total = HDR + header.length
                if end - start < total:
                    break
                payload = buf[start + HDR:start + total]
                wire.verify_payload(buf[start:start + HDR], header, payload)
                remaining -= await self._small_packet(header, payload)
                start += total
                after_chunk = False
            if not remaining:
                break
            if start == end:
                start = end = 0
            elif start > len(buf) // 2:
                buf[:end - start] = buf[start:end]  # a partial small packet: move it forward
                start, end = 0, end - start
            # Streaming chunks, read only up to the next header so the payload after it
            # lands in its own slot; otherwise take as many small packets as fit.
            limit = start + HDR if after_chunk and end - start < HDR else len(buf)
            n = await fdio.recv_some(self._sock, buf[end:limit])
            if n == 0:
                raise ChannelError(f"data channel {self.worker} closed by the source before "
                                   f"the end of {self._unfinished()}")
            end += n

    def _unfinished(self) -> str:
        missing = [s.device.id for s in self._loads.values() if not s.ended]
        return ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")

    async def _receive_chunk(self, header: wire.PacketHeader, header_bytes: memoryview,
                             head: memoryview) -> None:
        """Receive a chunk into a slot of its own; ``head`` is what the window already has."""
        state = self._expect(header)
        slot = await self._slots.acquire(self._chunk_class)
        try:
            payload = slot.view[:header.length]
            payload[:len(head)] = head
            if len(head) < header.length and not await fdio.recv_exactly(
                    self._sock, payload[len(head):]):
                raise ChannelError(f"data channel {self.worker} closed inside a chunk of "
                                   f"{state.device.id}")
            wire.verify_payload(header_bytes, header, payload)
        except BaseException:
            self._slots.release(slot)
            raise
        state.packets += 1
        state.digest.add(header.checksum)
        if not state.start_ns:
            state.start_ns = time.monotonic_ns()
        if self._concurrent:
            assert state.queue is not None
            state.queue.put_nowait((slot, header.length, None))
        else:
            await self._write_chunk(state, slot, header.length)

    async def _small_packet(self, header: wire.PacketHeader, payload: memoryview) -> int:
        """Handle a RECORD or END packet; both end a device's load (return 1)."""
        state = self._expect(header)
        state.ended = True
        if header.kind is wire.PacketKind.RECORD:
            device = state.device
            if (self._executor is not None and isinstance(device, RecordDevice)
                    and device.releases_gil):
                await self._put_record_on_thread(state, payload)
            else:
                self._put_record(state, payload)
            return 1
        end = wire.decode_end(payload)
        if self._concurrent:
            assert self._tasks is not None and state.queue is not None
            state.queue.put_nowait((None, 0, end))
        else:
            await self._complete_stream(state, end)
        return 1

    def _expect(self, header: wire.PacketHeader) -> _Incoming:
        state = self._loads.get(header.device)
        if state is None:
            raise ProtocolError("packet.device", f"device {header.device} is not loaded by "
                                                 f"worker {self.worker}")
        if state.ended:
            raise ProtocolError("packet.seq", f"{state.device.id}: packet after its END")
        if header.seq != state.next_seq:
            raise ProtocolError("packet.seq", f"{state.device.id}: expected seq "
                                              f"{state.next_seq}, got {header.seq}")
        if header.kind is not wire.PacketKind.RECORD and isinstance(state.device, RecordDevice):
            raise ProtocolError("packet.flags", f"{state.device.id} is a record device, got "
                                                f"a {header.kind.name}")
        state.next_seq += 1
        if state.queue is None and self._concurrent and isinstance(state.device, StreamDevice):
            assert self._tasks is not None
            state.queue = asyncio.Queue()
            self._tasks.create_task(self._drive_stream(state))
        return state

    async def _drive_stream(self, state: _Incoming) -> None:
        assert state.queue is not None
        while True:
            slot, length, end = await state.queue.get()
            if slot is not None:
                await self._write_chunk(state, slot, length)
            else:
                assert end is not None
                await self._complete_stream(state, end)
                return

    async def _write_chunk(self, state: _Incoming, slot: Slot, length: int) -> None:
        device = state.device
        assert isinstance(device, StreamDevice)
        try:
            payload = slot.view[:length]
            await device.load_write(payload)
            state.bytes += len(payload)
        finally:
            self._slots.release(slot)

    async def _complete_stream(self, state: _Incoming, end: wire.EndOfState) -> None:
        self._check_end(state, end)
        device = state.device
        assert isinstance(device, StreamDevice)
        state.end_ns = time.monotonic_ns()
        await device.load_end()
        state.done_ns = time.monotonic_ns()

    async def _put_record_on_thread(self, state: _Incoming, payload: memoryview) -> None:
        """Single-vm: put on a thread (the ioctls drop the GIL) while receiving goes on."""
        # The window is reused at once: the record moves to a slot of its own, and the
        # record slots bound how many puts are in flight.
        slot = await self._slots.acquire(self._record_class)
        slot.view[:len(payload)] = payload
        put = asyncio.get_running_loop().run_in_executor(
            self._executor, self._put_record, state, slot.view[:len(payload)])
        put.add_done_callback(lambda _: self._slots.release(slot))
        self._puts.append(put)

    def _put_record(self, state: _Incoming, payload: memoryview) -> None:
        """Put one record. Runs in: the loop, or a single-vm put thread."""
        # A record is its device's whole state in one packet, whose verified checksum is
        # its digest: it needs no END of its own.
        device = state.device
        if not isinstance(device, RecordDevice):
            raise ProtocolError("packet.flags", f"{device.id} is a stream, got a RECORD")
        state.start_ns = time.monotonic_ns()
        device.put(payload)
        state.bytes = len(payload)
        state.packets = 1
        state.end_ns = state.done_ns = time.monotonic_ns()

    def _check_end(self, state: _Incoming, end: wire.EndOfState) -> None:
        if end.total_bytes != state.bytes or end.packets != state.packets:
            raise IntegrityError("end.bytes", f"{state.device.id}: source sent "
                                 f"{end.total_bytes} B in {end.packets} packets, received "
                                 f"{state.bytes} B in {state.packets}")
        if end.digest != state.digest.digest():
            raise IntegrityError("end.digest", f"{state.device.id}: state digest mismatch")
