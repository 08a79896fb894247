"""The packets of one data channel, queued and sent in order by one task.

Runs in: a source worker. Getters queue packets (slot views) as they fill them; the sender
writes them with one ``sendmsg`` per batch, paced to the channel's share of the bandwidth
limit, and gives each slot back once its bytes are out.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from devstate.net import fdio
from devstate.net.bandwidth import Pacer
from devstate.protocol import wire
from devstate.worker.faults import Fault, cut, injector, spoil

HDR = wire.PACKET_HEADER_BYTES

class PacketSender:
    """Sends packets on one channel in the order queued, batching, releasing slots after.

    Once closed and drained it ends the channel with a FIN counting the packets before it.
    """

    def __init__(self, sock: socket.socket, pacer: Pacer | None = None) -> None:
        self.sock = sock  # public: a fault cuts it
        self._pacer = pacer
        self._queue: list[tuple[memoryview | bytes, Callable[[], None] | None]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self.packets = 0

    def queue(self, data: memoryview | bytes, release: Callable[[], None] | None = None) -> None:
        """Queue one packet (header and payload contiguous in ``data``); ``release`` is
        called once the kernel has its bytes (or the send failed)."""
        self._queue.append((data, release))
        self.packets += 1
        self._wakeup.set()

    def unpace(self) -> None:
        """Send at full speed from now on (a limit that paces only the precopy)."""
        self._pacer = None

    async def run(self) -> None:
        """Send until :meth:`close` was called and the queue is empty, then the FIN."""
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        break
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                # Paced, a packet at a time (each a chunk at most): the pacer's burst
                # covers one, so the rate holds without cutting packets. With a fault
                # armed at "send", a packet at a time too: it strikes at an exact packet.
                one = self._pacer is not None or injector.armed_at("send")
                take = 1 if one else fdio.IOV_MAX
                batch, self._queue = self._queue[:take], self._queue[take:]
                packets = [data for data, _ in batch]
                fault = injector.strike("send", channels=(self.sock,))
                if fault is not None:
                    first = spoil(fault, memoryview(packets[0]))
                    packets = [first] if fault is Fault.TRUNCATE else [first, *packets[1:]]
                try:
                    await fdio.send_all(self.sock, packets)
                    if fault is Fault.TRUNCATE:
                        cut(self.sock)
                finally:
                    for _, release in batch:
                        if release is not None:
                            release()
                if self._pacer is not None:
                    await self._pacer.spend(sum(len(data) for data, _ in batch))
            fin = memoryview(bytearray(HDR))
            wire.pack_packet_header(fin, wire.PacketKind.FIN, 0, self.packets, b"")
            await fdio.send_all(self.sock, [fin])
        finally:
            for _, release in self._queue:  # a failed send: hand every slot back
                if release is not None:
                    release()
            self._queue.clear()

    def close(self) -> None:
        """No more packets will be queued; :meth:`run` ends once the queue drains."""
        self._closing = True
        self._wakeup.set()
