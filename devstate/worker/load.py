"""The destination side of one worker: receive packets into the arena and put its devices.

Runs in: a destination worker process, on its event loop. The worker owns its devices, its
partition of the arena and its data channels (none, one or several: :mod:`devstate.net.route`).

Receiving: small packets (records, END markers) arrive batched into a channel's receive
*window*, a slot of the arena, and records of this worker's devices are put straight from
there. A stream CHUNK's payload, and a RECORDS packet (a batch of a KVM VM's vCPUs), goes
to a chunk slot of its own: after such a header, the receiver reads only up to the next
header, so payloads land in their slot by ``recv_into`` without a copy (a copy happens only
for payload bytes that shared one read with small packets before them). A batch's records
are queued and put from that slot, whatever has arrived split over the owner's threads,
while the channels go on receiving (the source sends them a batch at a time, so get,
transfer and put overlap); a vCPU that came alone in a RECORD is first copied out of the
window into a record slot. When no chunk slot is free the receiver stops reading: the channel
fills and the sender blocks (backpressure, bounded memory). Each channel has its own share
of the chunk slots: a channel whose slots all hold packets that came early must never
starve the channel that carries the packet they wait for. Each channel ends with a FIN that
counts its packets.

Owners: a packet of a device another worker owns is handed to it (:mod:`devstate.worker.handoff`):
a chunk's slot is lent as it is; a small packet is first copied out of the window into a
record slot. The owner gives the slot back once the bytes are written to the device.

Order and integrity: every packet's checksum is verified on arrival; the owner accepts each
device's packets in sequence order, holding any that arrive early (spread routing: the
packets of one stream come over several channels) in the slots they arrived in, so
reassembly copies nothing. Records come exactly once; each device's END digest (over its
packets' checksums, in order: :class:`~devstate.protocol.wire.StateDigest`) and byte count
must match before the device counts as loaded. Any failure raises, which cancels every task
of the load.

Concurrent mode gives each stream device its own task (chunks queue to it in order), so one
device's slow writes or firmware latency never block another. Sequential mode handles each
packet of its own channels to completion before reading the next, as VMMs do today (a
device that waits on a dependency, or a packet handed over by another worker, is the
exception: waiting there could block what it waits for).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

from devstate.arena.slots import Slot
from devstate.devices.base import Device, RecordBatch, RecordDevice, StreamDevice
from devstate.errors import ChannelError, IntegrityError, ProtocolError
from devstate.net import fdio
from devstate.protocol import wire
from devstate.worker.completion import CompletionOrder
from devstate.worker.faults import injector, spoil_record
from devstate.worker.handoff import Note, Op, raise_when_set
from devstate.worker.holdings import Holdings
from devstate.worker.incoming import Incoming, Release
from devstate.worker.jobs import ResultRow
from devstate.worker.threads import RECORD_BATCH, batched_records, finish_on_thread

HDR = wire.PACKET_HEADER_BYTES


class Loader:
    """Receives one worker's channels and loads the devices it owns."""

    def __init__(self, held: Holdings, windows: dict[int, Slot], owner: tuple[int, ...],
                 gen: int, *, after: tuple[tuple[int, ...], ...] | None = None,
                 readback: bool = True) -> None:
        self.worker = held.worker
        self._devices = held.devices
        self._slots = slots = held.slots
        self._arena = held.arena
        self._windows = windows
        self._channels = channels = held.channels
        self._mesh = mesh = held.mesh
        self._owner = owner
        self._gen = gen
        self._record_class = held.record_class
        self._chunk_class = chunk_class = held.chunk_class
        self._executor = held.executor
        self._threads = held.threads
        self._batch = held.batch
        self._batched_ids = batched_records(held)
        self._readback = readback  # batched puts read each record's device back
        self._to_put: list[_QueuedPut] = []  # batched records waiting for their put
        self._queued = asyncio.Event()
        self._putting: list[asyncio.Task[None]] = []
        self._max_chunk = slots.sizes[chunk_class] - HDR
        share = slots.counts[chunk_class] // max(1, len(channels))
        if channels and share < 1:
            raise ValueError(f"{len(channels)} channels need as many chunk slots")
        self._shares = {k: asyncio.Semaphore(share) for k in channels}
        self._max_payload = max([self._max_chunk] + [w.size - HDR for w in windows.values()])
        self._loads: dict[int, Incoming] = {}
        self._unloaded = 0
        # Completion order: device i completes its load after every device in after[i]
        # (spec ``after``), wherever those load; LOADED notes say so across workers.
        self._order = CompletionOrder(after or tuple(() for _ in owner), mesh)
        self._all_loaded = asyncio.Event()
        # offset -> our slot held by its device's owner, and the channel share it counts in
        self._lent: dict[int, tuple[Slot, asyncio.Semaphore | None]] = {}
        self._all_back = asyncio.Event()
        self._all_back.set()
        self._concurrent = False
        self._tasks: asyncio.TaskGroup | None = None
        self._fault: asyncio.Future[None] | None = None

    async def run(self, indices: Iterable[int], concurrent: bool) -> list[ResultRow]:
        """Load every device in ``indices``; return once each is put and verified, every
        channel of this worker has ended, and every slot it lent is back."""
        self._concurrent = concurrent
        self._loads = {i: Incoming(self._devices[i]) for i in indices}
        self._unloaded = len(self._loads)
        if not self._unloaded:
            self._all_loaded.set()
        self._fault = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                watch = tg.create_task(raise_when_set(self._fault))
                # Only now: notes that came early are replayed at once, and a stream's
                # first packet starts a task in this group.
                if self._mesh is not None:
                    self._mesh.serve(self._gen, self._on_note)
                await asyncio.gather(*(tg.create_task(self._receive(k, sock))
                                       for k, sock in self._channels.items()))
                await self._all_loaded.wait()  # batched puts included
                await self._all_back.wait()
                watch.cancel()
        finally:
            if self._mesh is not None:
                self._mesh.stop()
            self._release_held()
        return [(i, s.device.id, s.bytes, s.packets, s.start_ns, s.end_ns, self.worker,
                 s.done_ns) for i, s in self._loads.items()]

    def _release_held(self) -> None:
        """After a failed load: every slot still lent or held early goes back to its pool."""
        for state in self._loads.values():
            state.release_early()
        for lent in self._lent.values():
            self._give_back(*lent)
        self._lent.clear()

    async def _receive(self, channel: int, sock: socket.socket) -> None:
        buf = self._windows[channel].view
        # A small packet must fit in half the window, so moving a partial one to the front
        # always makes room for the rest of it.
        max_small = len(buf) // 2 - HDR
        start = end = 0
        packets = 0
        after_chunk = False
        while True:
            while end - start >= HDR:
                header = wire.decode_packet_header(buf[start:start + HDR],
                                                   devices=len(self._owner),
                                                   max_payload=self._max_payload)
                if header.kind in _OWN_SLOT:
                    have = min(end - start - HDR, header.length)
                    await self._receive_chunk(channel, sock, header, buf[start:start + HDR],
                                              buf[start + HDR:start + HDR + have])
                    start += HDR + have
                    packets += 1
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
                if header.kind is wire.PacketKind.FIN:
                    _check_fin(channel, header, packets, end - start - total)
                    return
                await self._small_packet(header, payload)
                packets += 1
                start += total
                after_chunk = False
            if start == end:
                start = end = 0
            elif start > len(buf) // 2:
                buf[:end - start] = buf[start:end]  # a partial small packet: move it forward
                start, end = 0, end - start
            # Streaming chunks, read only up to the next header so the payload after it
            # lands in its own slot; otherwise take as many small packets as fit.
            limit = start + HDR if after_chunk and end - start < HDR else len(buf)
            n = await fdio.recv_some(sock, buf[end:limit])
            if n == 0:
                raise ChannelError(f"data channel {channel} closed by the source before its "
                                   f"end ({self._unfinished()} still loading here)")
            end += n

    def _unfinished(self) -> str:
        missing = [s.device.id for s in self._loads.values() if not s.done_ns]
        if not missing:
            return "nothing"
        return ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")

    async def _receive_chunk(self, channel: int, sock: socket.socket,
                             header: wire.PacketHeader, header_bytes: memoryview,
                             head: memoryview) -> None:
        """Receive a chunk into a slot of its own; ``head`` is what the window already has."""
        if header.length > self._max_chunk:
            raise ProtocolError("packet.length", f"a CHUNK of {header.length} B exceeds the "
                                                 f"chunk slots' {self._max_chunk} B")
        share = self._shares[channel]
        await share.acquire()
        slot = await self._slots.acquire(self._chunk_class)
        try:
            payload = slot.view[:header.length]
            payload[:len(head)] = head
            if len(head) < header.length and not await fdio.recv_exactly(
                    sock, payload[len(head):]):
                raise ChannelError(f"data channel {channel} closed inside a chunk of device "
                                   f"{header.device}")
            wire.verify_payload(header_bytes, header, payload)
        except BaseException:
            self._slots.release(slot)
            share.release()
            raise
        if header.kind is wire.PacketKind.RECORDS:
            await self._take_records(payload, partial(self._give_back, slot, share))
            return
        owner = self._owner[header.device]
        if owner != self.worker:
            self._lend(owner, header, slot, share)
            return
        state = self._accept(header.kind, header.device, header.seq, header.checksum,
                             payload, partial(self._give_back, slot, share))
        await self._settled(state, header.device)

    async def _take_records(self, payload: memoryview, release: Release) -> None:
        """Take each record of a verified RECORDS packet: ours are put straight from the
        packet's slot (``release`` gives it back after the last), another worker's are
        lent in a record slot of their own, as a RECORD."""
        records = wire.decode_records(payload, devices=len(self._owner))
        held = _Held(release, len(records))
        try:
            for index, record in records:
                owner = self._owner[index]
                if owner != self.worker:
                    slot = await self._slots.acquire(self._record_class)
                    slot.view[:len(record)] = record
                    # The packet's checksum covered it; a lent RECORD's is not checked again.
                    self._lend(owner, wire.PacketHeader(wire.PacketKind.RECORD, index, 0,
                                                        len(record), 0), slot)
                    held.take()
                    held.release()
                    continue
                held.take()  # before the accept: a failing accept keeps it (the load fails)
                state = self._accept(wire.PacketKind.RECORD, index, 0, 0, record, held.release)
                if not self._concurrent:  # (a coroutine per record costs, in the downtime)
                    await self._settled(state, index)
        finally:
            held.drop_untaken()

    async def _small_packet(self, header: wire.PacketHeader, payload: memoryview) -> None:
        """Handle a RECORD or END packet that sits in a receive window."""
        owner = self._owner[header.device]
        if owner != self.worker:
            # The window is reused at once: the packet moves to a record slot, lent.
            slot = await self._slots.acquire(self._record_class)
            slot.view[:len(payload)] = payload
            self._lend(owner, header, slot)
            return
        release: Release | None = None
        if header.kind is wire.PacketKind.RECORD and self._batched(header.device):
            # Put in a batch while the window is reused: the record moves to a slot of its
            # own, and the record slots bound how many puts are in flight.
            slot = await self._slots.acquire(self._record_class)
            slot.view[:len(payload)] = payload
            payload = slot.view[:len(payload)]
            release = partial(self._give_back, slot)
        state = self._accept(header.kind, header.device, header.seq, header.checksum,
                             payload, release)
        await self._settled(state, header.device)

    async def _settled(self, state: Incoming, index: int) -> None:
        """Sequential mode: a packet is handled to completion before the next is read,
        unless its device waits on another, which may come later on this channel."""
        if not self._concurrent and state.queue is not None and self._order.ready(index):
            await state.queue.join()

    def _batched(self, index: int) -> bool:
        """Whether device ``index`` is put in batches on the owner's threads."""
        return index in self._batched_ids

    def _give_back(self, slot: Slot, share: asyncio.Semaphore | None = None) -> None:
        """A slot is free again (and back in its channel's share, if it counts in one)."""
        self._slots.release(slot)
        if share is not None:
            share.release()

    def _lend(self, owner: int, header: wire.PacketHeader, slot: Slot,
              share: asyncio.Semaphore | None = None) -> None:
        assert self._mesh is not None
        self._lent[slot.offset] = (slot, share)
        self._all_back.clear()
        self._mesh.send(owner, Op.DELIVER, kind=header.kind, device=header.device,
                        seq=header.seq, length=header.length, offset=slot.offset,
                        checksum=header.checksum)

    def _on_note(self, peer: int, note: Note | None) -> None:
        """A note from another destination worker (see :mod:`devstate.worker.handoff`)."""
        assert self._mesh is not None
        try:
            if note is None:
                raise ChannelError(f"worker {peer} closed its link during the load")
            if note.op == Op.DELIVER:
                kind = wire.PacketKind(note.kind)
                payload = self._arena[note.offset:note.offset + note.length]
                self._accept(kind, note.device, note.seq, note.checksum, payload,
                             partial(self._mesh.send, peer, Op.RELEASE, offset=note.offset,
                                     gen=note.gen))
            elif note.op == Op.LOADED:
                self._order.loaded(note.device)
            elif note.op == Op.RELEASE:
                lent = self._lent.pop(note.offset, None)
                if lent is not None:
                    self._give_back(*lent)
                if not self._lent:
                    self._all_back.set()
            else:
                raise ProtocolError("handoff.op", f"worker {peer} sent op {note.op}")
        except Exception as exc:  # noqa: BLE001 - any failure here fails the load
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        assert self._fault is not None
        if not self._fault.done():
            self._fault.set_exception(exc)

    def _accept(self, kind: wire.PacketKind, index: int, seq: int, checksum: int,
                payload: memoryview, release: Release | None) -> Incoming:
        """Take a verified packet of a device this worker owns, in whatever order it came.

        ``release`` gives back the slot holding ``payload``; None: the payload sits in a
        receive window, valid only until this returns.
        """
        state = self._loads.get(index)
        if state is None:
            raise ProtocolError("packet.device", f"device {index} is not loaded by worker "
                                                 f"{self.worker}")
        if state.ended:
            raise ProtocolError("packet.seq", f"{state.device.id}: packet after its end")
        device = state.device
        if kind is wire.PacketKind.RECORD:
            if not isinstance(device, RecordDevice):
                raise ProtocolError("packet.flags", f"{device.id} is a stream, got a RECORD")
            state.ended = True
            if not self._order.ready(index):
                # Its dependencies load elsewhere, later: keep a copy of the record (small,
                # one per device at most), not a slot a receiver may need to progress.
                data = memoryview(bytes(payload))
                if release is not None:
                    release()
                assert self._tasks is not None
                self._tasks.create_task(self._put_when_ready(state, index, data))
                return state
            if release is not None and self._batched(index):
                self._queue_put(_QueuedPut(state, index, payload, release))
                return state
            try:
                state.put_record(payload)
            finally:
                if release is not None:
                    release()
            self._loaded_one(index)
            return state
        if isinstance(device, RecordDevice):
            raise ProtocolError("packet.flags", f"{device.id} is a record device, got a "
                                                f"{kind.name}")
        for packet in state.in_order(kind, seq, checksum, payload, release):
            if state.queue is None:  # its first packet: the stream's task starts
                assert self._tasks is not None
                state.queue = asyncio.Queue()
                self._tasks.create_task(self._drive_stream(state))
            state.queue.put_nowait(packet)
        return state

    async def _drive_stream(self, state: Incoming) -> None:
        assert state.queue is not None
        device = state.device
        assert isinstance(device, StreamDevice)
        while True:
            payload, release, end = await state.queue.get()  # a Packet
            if payload is not None:
                try:
                    await device.load_write(payload)
                    state.bytes += len(payload)
                    injector.strike("put", model_pid=getattr(device, "pid", None),
                                    channels=self._channels.values())
                finally:
                    if release is not None:
                        release()
                state.queue.task_done()
                continue
            assert end is not None
            state.check_end(end)
            state.end_ns = time.monotonic_ns()
            await self._order.wait(state.device.spec.index)  # its data is in; the end waits
            injector.strike("complete", model_pid=getattr(device, "pid", None))
            await device.load_end()
            state.done_ns = time.monotonic_ns()
            self._loaded_one(state.device.spec.index)
            state.queue.task_done()
            return

    def _loaded_one(self, index: int) -> None:
        """Device ``index`` (ours) is loaded: count it, and tell whoever waits on it."""
        self._unloaded -= 1
        if not self._unloaded:
            self._all_loaded.set()
            self._queued.set()  # the batch putter ends
        self._order.loaded_here(index)

    async def _put_when_ready(self, state: Incoming, index: int, data: memoryview) -> None:
        await self._order.wait(index)
        if self._batched(index):
            self._queue_put(_QueuedPut(state, index, data, None))
        else:
            state.put_record(data)
            self._loaded_one(index)

    def _queue_put(self, put: _QueuedPut) -> None:
        """Queue a batched record; a put lane (one per owner thread, started with the
        first record) takes it."""
        self._to_put.append(put)
        if not self._putting:
            assert self._tasks is not None
            self._putting = [self._tasks.create_task(self._put_lane())
                             for _ in range(self._threads)]
        self._queued.set()

    async def _put_lane(self) -> None:
        """One owner thread's lane: put its share of whatever is queued (up to
        RECORD_BATCH records) in one call on its thread, while the channels go on
        receiving; the lanes never wait for each other."""
        while not self._all_loaded.is_set():
            if not self._to_put:
                self._queued.clear()
                await self._queued.wait()
                continue
            # A share, not all: a RECORDS packet queues a whole batch at once, which the
            # other lanes should put alongside rather than wait for the next packet.
            share = min(RECORD_BATCH, -(-len(self._to_put) // self._threads))
            taken = self._to_put[:share]
            del self._to_put[:share]
            if self._to_put:
                self._queued.set()  # more than this lane takes: wake a waiting one
            assert self._batch is not None  # only batched records are queued
            fault = injector.strike("record-put")
            if fault is not None:
                spoil_record(fault, self._devices[taken[0].index], taken[0].record)
            try:
                start_ns, end_ns = await finish_on_thread(
                    self._executor, _put_many, self._batch,
                    [self._devices[p.index] for p in taken], [p.record for p in taken],
                    self._readback)
            finally:
                for put in taken:
                    if put.release is not None:
                        put.release()
            for put in taken:
                put.state.record_loaded(len(put.record), start_ns, end_ns)
                self._loaded_one(put.index)


# Packets received into a slot of their own rather than a receive window: a stream's chunks
# and batches of records (put straight from it).
_OWN_SLOT = frozenset({wire.PacketKind.CHUNK, wire.PacketKind.RECORDS})


class _Held:
    """A RECORDS packet's slot, held until every record in it was put (or copied)."""

    __slots__ = ("_release", "_left", "_untaken")

    def __init__(self, release: Release, records: int) -> None:
        self._release = release
        self._left = records
        self._untaken = records

    def take(self) -> None:
        """A record is taken (to be put, or copied), and released by its taker."""
        self._untaken -= 1

    def release(self) -> None:
        """One record is done with the slot; the last gives it back."""
        self._left -= 1
        if not self._left:
            self._release()

    def drop_untaken(self) -> None:
        """Records never taken (a failure part-way) are done with it too."""
        while self._untaken > 0:
            self._untaken -= 1
            self.release()


@dataclass(frozen=True, slots=True)
class _QueuedPut:
    """A batched record waiting for its put: in ``record`` (a slot ``release`` gives back,
    or a copy of its own if None)."""

    state: Incoming
    index: int
    record: memoryview
    release: Release | None


def _put_many(group: RecordBatch, devices: Sequence[Device], records: Sequence[memoryview],
              readback: bool) -> tuple[int, int]:
    """Runs in: one of the owner's threads. Put ``records`` in one call of their batch."""
    start = time.monotonic_ns()
    group.put_many(devices, records, readback=readback)  # type: ignore[arg-type]
    return start, time.monotonic_ns()


def _check_fin(channel: int, fin: wire.PacketHeader, received: int, after: int) -> None:
    """A channel's FIN counts the packets sent on it, and nothing may follow it."""
    if fin.seq != received:
        raise IntegrityError("fin.packets", f"channel {channel}: the source sent {fin.seq} "
                                            f"packets, received {received}")
    if after:
        raise ProtocolError("packet.flags", f"channel {channel}: bytes after its FIN")
