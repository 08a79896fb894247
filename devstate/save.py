"""The source side of one worker: get its devices into arena slots and send them.

Runs in: a source worker process, on its event loop. The worker owns its devices, its
partition of the arena (a :class:`~devstate.arena.SlotPool`) and its data channel.

Each packet is built in place in one slot: the 32-byte header, then the payload the device
wrote straight into the slot. A :class:`PacketSender` task batches whatever packets are
ready into one ``sendmsg`` and releases their slots as soon as the kernel has the bytes,
so the slot count bounds memory and a full channel slows the getters (backpressure).

Concurrent mode drives every stream device in its own task and the record devices in one
more task that yields to the loop every few records, so one device waiting on its data fd
never holds up another. Sequential mode saves one device after another, as VMMs do today.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from concurrent.futures import Executor

from devstate import fdio, wire
from devstate.arena import Slot, SlotPool
from devstate.devices.base import Device, RecordDevice, StreamDevice
from devstate.messages import ResultRow

HDR = wire.PACKET_HEADER_BYTES
# Records per batch: after each, the sender ships what is ready (so the destination starts
# putting at once) and stream devices get served, for one loop pass per 16 records; in
# single-vm mode a batch is what the get threads share.
RECORD_BATCH = 16


class PacketSender:
    """Sends packets on one channel in the order queued, batching, releasing slots after."""

    def __init__(self, sock: socket.socket, slots: SlotPool) -> None:
        self._sock = sock
        self._slots = slots
        self._queue: list[tuple[memoryview | bytes, Slot | None]] = []
        self._wakeup = asyncio.Event()
        self._closing = False

    def queue(self, data: memoryview | bytes, slot: Slot | None = None) -> None:
        """Queue one packet (header and payload contiguous in ``data``)."""
        self._queue.append((data, slot))
        self._wakeup.set()

    async def run(self) -> None:
        """Send until :meth:`close` was called and the queue is empty."""
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, self._queue = self._queue[:fdio.IOV_MAX], self._queue[fdio.IOV_MAX:]
            try:
                await fdio.send_all(self._sock, [data for data, _ in batch])
            finally:
                for _, slot in batch:
                    if slot is not None:
                        self._slots.release(slot)

    def close(self) -> None:
        """No more packets will be queued; :meth:`run` ends once the queue drains."""
        self._closing = True
        self._wakeup.set()


class Saver:
    """Gets and sends the devices one worker owns."""

    def __init__(self, worker: int, devices: dict[int, Device], slots: SlotPool,
                 sock: socket.socket, *, record_class: int, chunk_class: int,
                 executor: Executor | None = None) -> None:
        self.worker = worker
        self._devices = devices
        self._slots = slots
        self._record_class = record_class
        self._executor = executor
        self._chunk_class = chunk_class
        self._sender = PacketSender(sock, slots)

    async def run(self, order: Sequence[int], concurrent: bool) -> list[ResultRow]:
        """Save every device in ``order``; return their results once all bytes are sent."""
        results: list[ResultRow] = []
        async with asyncio.TaskGroup() as tg:
            sending = tg.create_task(self._sender.run())
            try:
                if concurrent:
                    records = [i for i in order if isinstance(self._devices[i], RecordDevice)]
                    streams = [i for i in order if isinstance(self._devices[i], StreamDevice)]
                    jobs = [tg.create_task(self._save_stream(i)) for i in streams]
                    if records:
                        results.extend(await self._save_records(records))
                    results.extend([await job for job in jobs])
                else:
                    for run in _runs_of_same_shape(order, self._devices):
                        if isinstance(self._devices[run[0]], RecordDevice):
                            results.extend(await self._save_records(run))
                        else:
                            results.append(await self._save_stream(run[0]))
            finally:
                self._sender.close()
            await sending
        return results

    async def _save_records(self, indices: Sequence[int]) -> list[ResultRow]:
        results = []
        for start in range(0, len(indices), RECORD_BATCH):
            batch = indices[start:start + RECORD_BATCH]
            slots = [await self._slots.acquire(self._record_class) for _ in batch]
            loop = asyncio.get_running_loop()
            # Single-vm: gets that drop the GIL start on the worker's threads, the rest run
            # here meanwhile; then the threads' results are collected in order.
            pending = [loop.run_in_executor(self._executor, self._get_record, i, slot)
                       if self._on_thread(i) else self._get_record(i, slot)
                       for i, slot in zip(batch, slots, strict=True)]
            timed = [await p if isinstance(p, asyncio.Future) else p for p in pending]
            for index, slot, (length, start_ns, end_ns) in zip(batch, slots, timed, strict=True):
                payload = slot.view[HDR:HDR + length]
                # One packet is the whole record; its checksum is its digest: no END follows.
                wire.pack_packet_header(slot.view, wire.PacketKind.RECORD, index, 0, payload)
                self._sender.queue(slot.view[:HDR + length], slot)
                results.append((index, self._devices[index].id, length, 1, start_ns, end_ns,
                                self.worker))
            await asyncio.sleep(0)  # let the sender ship the batch and streams progress
        return results

    def _on_thread(self, index: int) -> bool:
        device = self._devices[index]
        return (self._executor is not None and isinstance(device, RecordDevice)
                and device.releases_gil)

    def _get_record(self, index: int, slot: Slot) -> tuple[int, int, int]:
        """Get one record into its slot. Runs in: the loop, or a single-vm get thread."""
        device = self._devices[index]
        assert isinstance(device, RecordDevice)
        start = time.monotonic_ns()
        length = device.get(slot.view[HDR:])
        return length, start, time.monotonic_ns()

    async def _save_stream(self, index: int) -> ResultRow:
        device = self._devices[index]
        assert isinstance(device, StreamDevice)
        start = time.monotonic_ns()
        await device.save_begin()
        digest = wire.StateDigest()
        seq = total = 0
        at_end = False
        while not at_end:
            slot = await self._slots.acquire(self._chunk_class)
            capacity = slot.size - HDR
            filled = 0
            while filled < capacity:
                n = await device.save_read(slot.view[HDR + filled:HDR + capacity])
                if n == 0:
                    at_end = True
                    break
                filled += n
            if filled == 0:
                self._slots.release(slot)
                continue
            payload = slot.view[HDR:HDR + filled]
            digest.add(wire.pack_packet_header(slot.view, wire.PacketKind.CHUNK, index, seq,
                                               payload))
            self._sender.queue(slot.view[:HDR + filled], slot)
            seq += 1
            total += filled
        self._queue_end(index, seq, digest.digest(), total, seq)
        await device.save_end()
        return index, device.id, total, seq, start, time.monotonic_ns(), self.worker

    def _queue_end(self, index: int, seq: int, digest: bytes, total: int, packets: int) -> None:
        packet = bytearray(HDR + wire.END_PAYLOAD_BYTES)
        view = memoryview(packet)
        view[HDR:] = wire.pack_end(digest, total, packets)
        wire.pack_packet_header(view, wire.PacketKind.END, index, seq, view[HDR:])
        self._sender.queue(packet)


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
