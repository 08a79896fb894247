"""The source side of one worker: get its devices into arena slots and send them.

Runs in: a source worker process, on its event loop. The worker owns its devices, its
partition of the arena (a :class:`~devstate.arena.slots.SlotPool`) and its data channels (none,
one or several: :mod:`devstate.net.route`).

Each packet is built in place in one slot: the 32-byte header, then the payload the device
wrote straight into the slot (a KVM VM's vCPUs: a batch of records an owner thread got
into one slot, a RECORDS packet). The route picks the packet's channel. On a channel of this
worker a :class:`PacketSender` task batches whatever packets are ready into one ``sendmsg``
and releases their slots as soon as the kernel has the bytes; on another worker's channel
the slot is lent to that worker (:mod:`devstate.worker.handoff`), which sends it and gives it back.
Either way the slot count bounds memory and a full channel slows the getters.

A stream's packets reach their channels' queues in sequence order, even across workers: a
packet bound for another channel than the one before waits until that one is queued. This
is what keeps the destination's reassembly free of deadlock with bounded slots: a packet
it holds out of order only ever waits for packets queued, hence sent, before it.

Concurrent mode drives every stream device in its own task and the record devices in one
more task that yields to the loop every few records, so one device waiting on its data fd
never holds up another; a stream's reads wait for its turn in the plan's transfer order
(:mod:`devstate.planning.admission`), which every worker follows. Sequential mode saves one device
after another, as VMMs do today.

Precopy (a ``switchover`` event given): while the VM still runs, every device that supports
it streams its initial and dirty bytes (VFIO PRE_COPY) as ordinary CHUNKs, and everything
else waits; when the coordinator switches over, the same sessions go on into stop-and-copy
(the stream's sequence numbers and digest continue) and the rest is saved.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from functools import partial

from devstate.arena.slots import Slot
from devstate.config.params import Routing
from devstate.devices.base import Device, RecordBatch, RecordDevice, StreamDevice
from devstate.errors import ChannelError, ProtocolError
from devstate.lifecycle import background
from devstate.net.bandwidth import Pacer
from devstate.net.route import SPREAD, Routes
from devstate.planning.admission import Admission, TransferOrder
from devstate.protocol import wire
from devstate.worker.faults import Fault, injector, spoil, spoil_digest
from devstate.worker.handoff import Note, Op, raise_when_set
from devstate.worker.holdings import Holdings
from devstate.worker.jobs import ResultRow
from devstate.worker.sender import PacketSender
from devstate.worker.threads import (
    FIRST_BATCH,
    RECORD_BATCH,
    batched_records,
    finish_on_thread,
)

HDR = wire.PACKET_HEADER_BYTES
# How often a precopy stream with nothing to read looks again for dirtied state.
PRECOPY_POLL_S = 0.02


class Saver:
    """Gets and sends the devices one worker owns, on whichever channels the route says."""

    def __init__(self, held: Holdings, routes: Routes, gen: int, *,
                 bandwidth_limit: float | None = None, cap_stop_copy: bool = True,
                 transfer: TransferOrder | None = None) -> None:
        self.worker = held.worker
        self._devices = held.devices
        self._slots = held.slots
        self._arena = held.arena
        self._mesh = held.mesh
        self._routes = routes
        self._gen = gen
        self._record_class = held.record_class
        self._chunk_class = held.chunk_class
        self._executor = held.executor
        self._threads = held.threads
        self._batch = held.batch
        self._batched = batched_records(held)
        # A batch of records rides in one RECORDS packet, in a chunk slot, if two or more
        # fit there (at a stride of the largest record, 8-aligned).
        self._stride = -(-max((held.devices[i].spec.size for i in self._batched),
                              default=0) // 8) * 8
        self._per_packet = 0 if not self._stride else _records_per_packet(
            held.slots.sizes[held.chunk_class] - HDR, self._stride)
        # Else a slot per record: every lane's whole batch must fit in the record slots at
        # once, or two lanes could each hold part of theirs and wait for the rest forever.
        self._per_slots = max(1, min(RECORD_BATCH,
                                     held.slots.counts[held.record_class] // held.threads))
        self._senders = {
            k: PacketSender(sock, Pacer.for_channel(bandwidth_limit, routes.channels))
            for k, sock in held.channels.items()}
        self._sockets = [sender.sock for sender in self._senders.values()]  # a fault cuts
        self._cap_stop_copy = cap_stop_copy
        self._records_routed = 0
        self._admission = Admission(transfer or TransferOrder())
        # What a progress display shows (messages.Progress): devices whose last byte was
        # read, and state bytes read so far (precopy's included).
        self.devices_done = 0
        self.bytes_read = 0
        self._lent: dict[int, Slot] = {}  # offset -> our slot, queued on a peer's channel
        self._all_back = asyncio.Event()
        self._all_back.set()
        self._queued: dict[tuple[int, int], asyncio.Future[None]] = {}
        self._peers_done: set[int] = set()
        self._no_more_sends = asyncio.Event()
        self._fault: asyncio.Future[None] | None = None
        self._in_precopy: set[int] = set()
        self._early: frozenset[int] = frozenset()  # the devices that stream while running

    async def run(self, order: Sequence[int], concurrent: bool,
                  switchover: asyncio.Event | None = None, *, precopy: Collection[int] = (),
                  on_armed: Callable[[], None] = lambda: None) -> list[ResultRow]:
        """Save every device in ``order``; return their results once all bytes are sent.

        With ``switchover``, everything is set up first (channels' senders, the peers'
        notes served) and nothing is got before the event is set (the VM stops), except,
        what the devices in ``precopy`` (each supports it) stream meanwhile; ``on_armed``
        is called once it waits.
        """
        missing = set(self._routes.channels_of(self.worker)) - set(self._senders)
        if missing:
            raise RuntimeError(f"worker {self.worker} has no data channel "
                               f"{', '.join(map(str, sorted(missing)))}")
        results: list[ResultRow] = []
        self._early = frozenset(precopy)
        self._fault = asyncio.get_running_loop().create_future()
        peers = self._mesh.peers if self._mesh is not None else ()
        if not peers:
            self._no_more_sends.set()
        try:
            async with asyncio.TaskGroup() as tg:
                watch = tg.create_task(raise_when_set(self._fault))
                if self._mesh is not None:  # early notes are replayed now, into this run
                    self._mesh.serve(self._gen, self._on_note)
                sending = [tg.create_task(s.run()) for s in self._senders.values()]
                try:
                    if switchover is not None and not precopy:
                        on_armed()
                        await switchover.wait()
                        switchover = None  # stopped: save as if there never was a wait
                    if concurrent:
                        results = await self._save_at_once(tg, order, switchover, on_armed)
                    else:
                        results = await self._save_one_by_one(order)
                    if self._mesh is not None:
                        self._mesh.broadcast(Op.DONE)
                    if self._senders:  # peers may still hand packets to our channels
                        await self._no_more_sends.wait()
                finally:
                    for sender in self._senders.values():
                        sender.close()
                await asyncio.gather(*sending)
                await self._all_back.wait()
                watch.cancel()
        finally:
            if self._mesh is not None:
                self._mesh.stop()
            # A failed run: every worker's Save is cancelled with this one, so no peer
            # still reads the slots it was lent.
            for slot in self._lent.values():
                self._slots.release(slot)
            self._lent.clear()
        return results

    async def _save_at_once(self, tg: asyncio.TaskGroup, order: Sequence[int],
                            switchover: asyncio.Event | None,
                            on_armed: Callable[[], None]) -> list[ResultRow]:
        """Concurrent mode: every stream in a task of its own (in precopy from the start),
        the records once the VM has stopped."""
        records = [i for i in order if isinstance(self._devices[i], RecordDevice)]
        streams = [i for i in order if isinstance(self._devices[i], StreamDevice)]
        jobs = [tg.create_task(self._save_stream(i, switchover)) for i in streams]
        if switchover is not None:
            on_armed()
            await switchover.wait()
        results = await self._save_records(records) if records else []
        return results + [await job for job in jobs]

    async def _save_one_by_one(self, order: Sequence[int]) -> list[ResultRow]:
        """Sequential mode: each device in turn (a run of records as one batch)."""
        results: list[ResultRow] = []
        for run in _runs_of_same_shape(order, self._devices):
            if isinstance(self._devices[run[0]], RecordDevice):
                results.extend(await self._save_records(run))
            else:
                results.append(await self._save_stream(run[0]))
        return results

    def stopped(self) -> None:
        """The VM stopped: a limit that paces only the precopy lets go of the channels."""
        if not self._cap_stop_copy:
            for sender in self._senders.values():
                sender.unpace()

    def _emit(self, index: int, seq: int, slot: Slot, length: int, channel: int, *,
              ordered: bool = True) -> asyncio.Future[None] | None:
        """Queue the packet in ``slot[:length]`` on ``channel``.

        Returns, for an ``ordered`` packet (a stream's) on a channel of another worker, the
        future of that worker's QUEUED.
        """
        owner = self._routes.channel_owner(channel)
        if owner == self.worker:
            self._senders[channel].queue(slot.view[:length], partial(self._slots.release, slot))
            return None
        assert self._mesh is not None
        self._lent[slot.offset] = slot
        self._all_back.clear()
        self._mesh.send(owner, Op.SEND, channel=channel, device=index, seq=seq,
                        length=length, offset=slot.offset)
        if not ordered:
            return None
        queued = asyncio.get_running_loop().create_future()
        self._queued[index, seq] = queued
        return queued

    def _on_note(self, peer: int, note: Note | None) -> None:
        """A note from another source worker (see :mod:`devstate.worker.handoff`)."""
        try:
            self._take_note(peer, note)
        except Exception as exc:  # noqa: BLE001 - any failure here fails the save
            self._fail(exc)

    def _take_note(self, peer: int, note: Note | None) -> None:
        assert self._mesh is not None and self._fault is not None
        if note is None:
            self._fail(ChannelError(f"worker {peer} closed its link during the save"))
        elif note.op == Op.SEND:
            sender = self._senders.get(note.channel)
            if sender is None:
                self._fail(ProtocolError("handoff.channel", f"worker {peer} sent on channel "
                                         f"{note.channel}, not one of worker {self.worker}'s"))
                return
            sender.queue(self._arena[note.offset:note.offset + note.length],
                         partial(self._mesh.send, peer, Op.RELEASE, offset=note.offset,
                                 gen=note.gen))
            self._mesh.send(peer, Op.QUEUED, device=note.device, seq=note.seq)
        elif note.op == Op.QUEUED:
            queued = self._queued.pop((note.device, note.seq), None)
            if queued is not None and not queued.done():
                queued.set_result(None)
        elif note.op == Op.RELEASE:
            slot = self._lent.pop(note.offset, None)
            if slot is not None:
                self._slots.release(slot)
            if not self._lent:
                self._all_back.set()
        elif note.op == Op.SENT:
            self._admission.finished(note.device)
        elif note.op == Op.DONE:
            self._peers_done.add(peer)
            if len(self._peers_done) == len(self._mesh.peers):
                self._no_more_sends.set()
        else:
            self._fail(ProtocolError("handoff.op", f"worker {peer} sent op {note.op}"))

    def _fail(self, exc: Exception) -> None:
        assert self._fault is not None
        if not self._fault.done():
            self._fault.set_exception(exc)

    async def _save_records(self, indices: Sequence[int]) -> list[ResultRow]:
        """Get the records and ship each batch as soon as it is got.

        Batched records (a KVM VM's vCPUs) are got by one *lane* per owner thread: each
        takes the next RECORD_BATCH of them, gets them in one call on its thread and ships
        them, then takes more, so the threads never wait for each other and the loop sends
        one lane's batch while the others' are being got: get and transfer overlap, and the
        destination starts putting with the first batch. The other records are got on the
        loop meanwhile, a batch at a time.
        """
        results: list[ResultRow] = []
        batched = deque(i for i in indices if i in self._batched)
        alone = [i for i in indices if i not in self._batched]
        lanes = [asyncio.ensure_future(self._get_lane(batched, results))
                 for _ in range(self._threads)] if batched else []
        try:
            if lanes:  # their first batches go to the threads before the loop gets the rest
                await asyncio.sleep(0)
            for start in range(0, len(alone), RECORD_BATCH):
                batch = alone[start:start + RECORD_BATCH]
                slots = [await self._slots.acquire(self._record_class) for _ in batch]
                timed = [self._get_record(i, slot) for i, slot in zip(batch, slots, strict=True)]
                results += self._ship_records(batch, slots, timed)
                await asyncio.sleep(0)  # let the senders ship and streams progress
        finally:
            # Every lane ends before this returns or raises: a thread must not write into
            # a slot after the save is over.
            ended = await asyncio.gather(*lanes, return_exceptions=True)
        for outcome in ended:
            if isinstance(outcome, BaseException):
                raise outcome
        return results

    async def _get_lane(self, queue: deque[int], results: list[ResultRow]) -> None:
        """One owner thread's lane: get and ship batches from ``queue`` until it is empty
        (or another lane failed, which empties it). A batch is got straight into one
        RECORDS packet's slot when a chunk slot holds it, else into a slot per record."""
        assert self._batch is not None  # only batched records are queued
        size = min(FIRST_BATCH, self._per_packet or self._per_slots)
        while queue:
            batch = [queue.popleft() for _ in range(min(size, len(queue)))]
            size = self._per_packet or self._per_slots
            if self._per_packet:
                slot = await self._slots.acquire(self._chunk_class)
                start = HDR + wire.records_table_bytes(len(batch))
                outs = [slot.view[start + k * self._stride:start + (k + 1) * self._stride]
                        for k in range(len(batch))]
                slots = [slot]
            else:
                slots = [await self._slots.acquire(self._record_class) for _ in batch]
                outs = [slot.view[HDR:] for slot in slots]
            try:
                timed = await finish_on_thread(
                    self._executor, _get_many, self._batch, [self._devices[i] for i in batch],
                    outs)
            except BaseException:
                queue.clear()
                for slot in slots:
                    self._slots.release(slot)
                raise
            if self._per_packet:
                results += self._ship_batch(batch, slots[0], timed)
            else:
                results += self._ship_records(batch, slots, [timed] * len(batch))
            await asyncio.sleep(0)

    def _ship_batch(self, batch: Sequence[int], slot: Slot, timed: Timed) -> list[ResultRow]:
        """Make the records got into ``slot`` one RECORDS packet and queue it."""
        length = timed[0]
        size = wire.pack_records_table(slot.view[HDR:], batch, length, self._stride)
        wire.pack_packet_header(slot.view, wire.PacketKind.RECORDS, batch[0], 0,
                                slot.view[HDR:HDR + size])
        return self._queue_records(batch, slot, HDR + size, timed)

    def _ship_records(self, batch: Sequence[int], slots: Sequence[Slot],
                      timed: Sequence[Timed]) -> list[ResultRow]:
        """Make each got record a RECORD packet in its slot and queue it on its channel."""
        results = []
        for index, slot, got in zip(batch, slots, timed, strict=True):
            payload = slot.view[HDR:HDR + got[0]]
            # One packet is the whole record; its checksum is its digest: no END follows.
            wire.pack_packet_header(slot.view, wire.PacketKind.RECORD, index, 0, payload)
            results += self._queue_records((index,), slot, HDR + got[0], got)
        return results

    def _queue_records(self, indices: Sequence[int], slot: Slot, size: int,
                       timed: Timed) -> list[ResultRow]:
        """Queue the packet in ``slot[:size]``, carrying the records of ``indices`` (each
        of ``timed``'s length), on the next channel records take; their result rows."""
        length, start_ns, end_ns = timed
        # Records need no order among themselves: none waits for a QUEUED.
        channel = self._routes.channel(self.worker, self._records_routed)
        self._emit(indices[0], 0, slot, size, channel, ordered=False)
        self._records_routed += 1
        self.devices_done += len(indices)
        self.bytes_read += length * len(indices)
        return [(index, self._devices[index].id, length, 1, start_ns, end_ns, self.worker, 0,
                 channel) for index in indices]

    def _get_record(self, index: int, slot: Slot) -> Timed:
        """Get one record into its slot, on the loop."""
        device = self._devices[index]
        assert isinstance(device, RecordDevice)
        start = time.monotonic_ns()
        length = device.get(slot.view[HDR:])
        return length, start, time.monotonic_ns()

    async def _save_stream(self, index: int,
                           switchover: asyncio.Event | None = None) -> ResultRow:
        device = self._devices[index]
        assert isinstance(device, StreamDevice)
        digest = wire.StateDigest()
        hop = _Hop()
        seq = total = 0
        if switchover is not None:
            if index in self._early:
                seq, total = await self._precopy(index, device, switchover, digest, hop)
            await switchover.wait()
        early = total
        start = time.monotonic_ns()
        await device.save_begin()
        # The session is open (the device may start to stop its state meanwhile); its bytes
        # wait for their turn.
        await self._admission.turn(index)
        at_end = False
        while not at_end:
            slot = await self._slots.acquire(self._chunk_class)
            capacity = slot.size - HDR
            filled = 0
            while filled < capacity:
                n = await device.save_read(slot.view[HDR + filled:HDR + capacity])
                if n == 0:
                    # Into an empty packet, the end; into one with bytes, perhaps only
                    # no room for the device's next piece (a RAM extent's header): ship
                    # them and ask again.
                    at_end = filled == 0
                    break
                filled += n
            if filled == 0:
                self._slots.release(slot)
                continue
            await self._ship_chunk(hop, digest, index, seq, slot, filled, step="get")
            seq += 1
            total += filled
        self._admission.finished(index)
        self.devices_done += 1
        if self._mesh is not None:
            self._mesh.broadcast(Op.SENT, device=index)
        slot = await self._slots.acquire(self._record_class)
        end = slot.view[:HDR + wire.END_PAYLOAD_BYTES]
        sealed = digest.digest()
        if injector.strike("end", model_pid=getattr(device, "pid", None),
                           channels=self._sockets) is Fault.CORRUPT:
            sealed = spoil_digest(sealed)
        end[HDR:] = wire.pack_end(sealed, total, seq)
        wire.pack_packet_header(end, wire.PacketKind.END, index, seq, end[HDR:])
        await self._emit_in_order(hop, index, seq, slot, len(end))
        await device.save_end()
        channel = hop.channel if self._routes.routing is Routing.AFFINITY else SPREAD
        return (index, device.id, total, seq, start, time.monotonic_ns(), self.worker, 0, channel,
                early)

    async def _precopy(self, index: int, device: StreamDevice, switchover: asyncio.Event,
                       digest: wire.StateDigest, hop: _Hop) -> tuple[int, int]:
        """Stream ``device``'s precopy bytes until ``switchover``; return (packets, bytes)."""
        await device.precopy_begin()
        self._in_precopy.add(index)
        seq = total = 0
        reading: asyncio.Future[int] | None = None
        async with background(switchover.wait()) as (switched,):
            try:
                while not switchover.is_set():
                    slot = await self._slots.acquire(self._chunk_class)
                    filled, capacity = 0, slot.size - HDR
                    idle = False
                    while filled < capacity and not switchover.is_set():
                        reading = asyncio.ensure_future(
                            device.precopy_read(slot.view[HDR + filled:HDR + capacity]))
                        await asyncio.wait({reading, switched}, return_when=asyncio.FIRST_COMPLETED)
                        if not reading.done():
                            reading.cancel()  # switched over: stop-and-copy reads the rest
                            await asyncio.gather(reading, return_exceptions=True)
                            break
                        try:
                            filled += reading.result()
                        except OSError as exc:
                            if exc.errno != errno.ENOMSG:
                                raise
                            # Ship what there is; more comes as state is dirtied. Nothing:
                            # wait without the slot (the other devices' precopy needs the
                            # slots: 32 RAM ranges idle on a worker would hold them all).
                            idle = not filled
                            break
                    if not filled:
                        self._slots.release(slot)
                        if idle:
                            await asyncio.wait({switched}, timeout=PRECOPY_POLL_S)
                        continue
                    await self._ship_chunk(hop, digest, index, seq, slot, filled, step="precopy")
                    seq += 1
                    total += filled
            finally:
                if reading is not None and not reading.done():  # a cancelled save: stop it
                    reading.cancel()
                self._in_precopy.discard(index)
        return seq, total

    async def precopy_remaining(self) -> dict[int, int]:
        """Bytes each device in precopy still has to produce while running, by index
        (devices whose precopy has not begun yet are not in it)."""
        devices = {i: self._devices[i] for i in self._in_precopy}
        counts = await asyncio.gather(*(d.precopy_remaining()  # type: ignore[attr-defined]
                                        for d in devices.values()))
        return dict(zip(devices, counts, strict=True))

    async def _ship_chunk(self, hop: _Hop, digest: wire.StateDigest, index: int, seq: int,
                          slot: Slot, filled: int, *, step: str) -> None:
        """Make the ``filled`` bytes after the slot's header CHUNK ``seq`` of device
        ``index``, add its checksum to the device's digest, and emit it in order. ``step``
        (``precopy`` or ``get``) names where a fault may strike (devstate.worker.faults)."""
        fault = injector.strike(step, model_pid=getattr(self._devices[index], "pid", None),
                                channels=self._sockets)
        payload = slot.view[HDR:HDR + filled]
        if fault is not None:  # before the checksum: a valid packet of a stream gone bad
            payload = spoil(fault, payload)
        digest.add(wire.pack_packet_header(slot.view, wire.PacketKind.CHUNK, index, seq,
                                           payload))
        self.bytes_read += filled
        await self._emit_in_order(hop, index, seq, slot, HDR + filled)

    async def _emit_in_order(self, hop: _Hop, index: int, seq: int, slot: Slot,
                             length: int) -> None:
        """Emit a stream packet once the one before it is queued, if it changes channel."""
        channel = self._routes.channel(self.worker, seq)
        if hop.queued is not None and channel != hop.channel:
            await hop.queued
        hop.channel = channel
        hop.queued = self._emit(index, seq, slot, length, channel)


Timed = tuple[int, int, int]  # a got record's (length, start ns, end ns)


def _get_many(group: RecordBatch, devices: Sequence[Device],
              outs: Sequence[memoryview]) -> Timed:
    """Runs in: one of the owner's threads. Get ``devices`` in one call of their batch."""
    start = time.monotonic_ns()
    length = group.get_many(devices, outs)  # type: ignore[arg-type]
    return length, start, time.monotonic_ns()


class _Hop:
    """Where a stream's last packet went, and the future of its QUEUED if another worker's."""

    __slots__ = ("channel", "queued")

    def __init__(self) -> None:
        self.channel = -1
        self.queued: asyncio.Future[None] | None = None


def _records_per_packet(room: int, stride: int) -> int:
    """How many records of ``stride`` bytes a RECORDS packet takes in ``room`` bytes of
    payload, up to RECORD_BATCH; 0 if fewer than two fit (then each rides alone)."""
    fit = min(RECORD_BATCH, room // stride)
    while fit > 1 and wire.records_table_bytes(fit) + fit * stride > room:
        fit -= 1
    return fit if fit > 1 else 0


def _runs_of_same_shape(order: Sequence[int], devices: dict[int, Device]) -> list[list[int]]:
    """Split ``order`` into runs: consecutive records together, each stream on its own."""
    runs: list[list[int]] = []
    for i in order:
        if runs and isinstance(devices[i], RecordDevice) and isinstance(devices[runs[-1][0]],
                                                                        RecordDevice):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
