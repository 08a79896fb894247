"""A TCP proxy in front of a destination that breaks chosen channels on purpose, or counts
what plaintext data channels carry.

Every devstate channel opens with a plaintext hello naming its kind and index, so the
proxy can tell channels apart even when the rest is TLS. Per channel it can pass the bytes
through, answer a TLS handshake with garbage, refuse it (close at once), or cut it after
a number of bytes from the source; without TLS it can also parse the source's packets and
tally them per data channel. :meth:`Proxy.freeze` stops every channel in both directions at
once, closing nothing: a link where nothing moves. Runs in: the test's event loop, beside
the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from devstate.errors import ProtocolError
from devstate.protocol import wire


class Fault(enum.Enum):
    """What happens to a channel."""

    GARBAGE = "garbage"  # answer with bytes that are no TLS handshake
    REFUSE = "refuse"    # close as soon as the hello is read
    CUT = "cut"          # forward, then close both ends after ``cut_after`` bytes


@dataclass
class ChannelTally:
    """What the source sent on one data channel: bytes after the hello, and its packets."""

    bytes: int = 0
    records: Counter[int] = field(default_factory=Counter)  # device index -> records carried
    # device index -> the sequence numbers of its stream packets (CHUNKs and END) here
    streams: dict[int, list[int]] = field(default_factory=dict)
    fin_seq: int | None = None  # the FIN's packet count
    batches: int = 0  # RECORDS packets (several records in one)
    packets: int = 0  # packets before the FIN

    def feed(self, data: bytes, parser: PacketParser) -> None:
        self.bytes += len(data)
        for header, records in parser.feed(data):
            if header.kind is wire.PacketKind.FIN:
                assert self.fin_seq is None, "two FINs on one channel"
                self.fin_seq = header.seq
            else:
                self.packets += 1
                if records:
                    self.records.update(records)
                    self.batches += header.kind is wire.PacketKind.RECORDS
                else:
                    self.streams.setdefault(header.device, []).append(header.seq)


class PacketParser:
    """Splits a data channel's byte stream into packet headers, and the devices whose
    records each carries (RECORD: its device; RECORDS: the batch's, from its table)."""

    def __init__(self, devices: int) -> None:
        self._devices = devices
        self._header = bytearray()
        self._records_header: wire.PacketHeader | None = None
        self._payload = bytearray()  # a RECORDS payload, kept to read its table
        self._skip = 0

    def feed(self, data: bytes) -> list[tuple[wire.PacketHeader, list[int]]]:
        out: list[tuple[wire.PacketHeader, list[int]]] = []
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                if self._records_header is not None:
                    self._payload += view[:n]
                view = view[n:]
                if not self._skip and self._records_header is not None:
                    batch = wire.decode_records(memoryview(bytes(self._payload)),
                                                devices=self._devices)
                    out.append((self._records_header, [device for device, _ in batch]))
                    self._records_header = None
                    self._payload.clear()
                continue
            take = min(wire.PACKET_HEADER_BYTES - len(self._header), len(view))
            self._header += view[:take]
            view = view[take:]
            if len(self._header) == wire.PACKET_HEADER_BYTES:
                header = wire.decode_packet_header(bytes(self._header), devices=self._devices,
                                                   max_payload=1 << 30)
                self._skip = header.length
                self._header.clear()
                if header.kind is wire.PacketKind.RECORDS:
                    self._records_header = header
                else:
                    out.append((header, [header.device] if header.kind is wire.PacketKind.RECORD
                                else []))
        return out


@dataclass
class Proxy:
    """Where the proxy listens, what it does, and what it saw."""

    upstream: tuple[str, int]
    faults: dict[tuple[wire.ChannelKind, int], Fault]
    cut_after: int = 4 << 20
    count_packets: int = 0  # the device table's size: parse and tally data channels
    intrude: bool = False  # when data channel 1 connects, send intruders after it
    port: int = 0
    seen: list[tuple[wire.ChannelKind, int]] = field(default_factory=list)
    data: dict[int, ChannelTally] = field(default_factory=dict)
    intruders: asyncio.Future[None] | None = None
    held: asyncio.Event = field(default_factory=asyncio.Event)  # data channel 3 waits
    # Set while bytes move; cleared by freeze(), never set again.
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.flowing.set()

    def freeze(self) -> None:
        """From now on forward nothing, either way, on any channel, and close nothing:
        every pipe holds what it read and stops reading, so the peers' sends back up
        against full socket buffers while their connections stay open."""
        self.flowing.clear()

    @property
    def frozen(self) -> bool:
        return not self.flowing.is_set()

    @property
    def uri(self) -> str:
        """The URI the source should migrate to."""
        return f"tcp:127.0.0.1:{self.port}"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                limit: int | None, seen: Callable[[bytes], None] | None = None,
                flowing: asyncio.Event | None = None) -> None:
    moved = 0
    try:
        while data := await reader.read(1 << 16):
            if flowing is not None:
                await flowing.wait()  # frozen: hold these bytes (until cancelled)
            if seen is not None:
                seen(data)
            if limit is not None and moved + len(data) >= limit:
                writer.write(data[:limit - moved])
                await writer.drain()
                return
            moved += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _intrude(proxy: Proxy, hello: bytes) -> None:
    """Stray, duplicate and late connections to the destination, one after another:
    bytes that are no hello, another migration's channel and a second channel 1 while the
    destination still waits for channel 3 (held back until then), and, once the transfer
    runs, one more."""
    other = bytearray(hello)
    other[-16:] = bytes(16)  # the migration id: none of this migration's
    try:
        for opening in (b"GET / HTTP/1.0\r\n\r\n" + bytes(16), bytes(other), hello):
            await _connect_and_say(proxy.upstream, opening)
    finally:
        proxy.held.set()
    await asyncio.sleep(0.3)
    await _connect_and_say(proxy.upstream, hello)


async def _connect_and_say(upstream: tuple[str, int], opening: bytes) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        reader, writer = await asyncio.open_connection(*upstream)
        writer.write(opening)
        await writer.drain()
        await reader.read(1 << 10)  # until the destination closes it
        writer.close()


async def _serve(proxy: Proxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    try:
        first = await reader.readexactly(wire.HELLO_BYTES)
        hello = wire.decode_hello(first)
    except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
        writer.close()
        return
    proxy.seen.append((hello.kind, hello.index))
    fault = proxy.faults.get((hello.kind, hello.index))
    if fault is Fault.REFUSE:
        writer.close()
        return
    if fault is Fault.GARBAGE:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(b"this is no TLS server hello\n" * 64)
            await writer.drain()
            await reader.read(1 << 16)
        writer.close()
        return
    if proxy.intrude and (hello.kind, hello.index) == (wire.ChannelKind.DATA, 3):
        await proxy.held.wait()
    await proxy.flowing.wait()  # a channel opened on a frozen link never gets through
    up_reader, up_writer = await asyncio.open_connection(*proxy.upstream)
    up_writer.write(first)
    await up_writer.drain()
    if proxy.intrude and (hello.kind, hello.index) == (wire.ChannelKind.DATA, 1):
        proxy.intruders = asyncio.ensure_future(_intrude(proxy, first))
    limit = proxy.cut_after if fault is Fault.CUT else None
    seen = None
    if proxy.count_packets and hello.kind is wire.ChannelKind.DATA:
        tally = proxy.data.setdefault(hello.index, ChannelTally())
        parser = PacketParser(proxy.count_packets)

        def seen(data: bytes) -> None:
            tally.feed(data, parser)

    await asyncio.gather(_pipe(reader, up_writer, limit, seen, proxy.flowing),
                         _pipe(up_reader, writer, limit, flowing=proxy.flowing))


@contextlib.asynccontextmanager
async def faulty_proxy(upstream: tuple[str, int],
                       faults: dict[tuple[wire.ChannelKind, int], Fault],
                       cut_after: int = 4 << 20, *,
                       count_packets: int = 0, intrude: bool = False) -> AsyncIterator[Proxy]:
    """Run a proxy to ``upstream`` on a free port of 127.0.0.1 for the body's duration.

    ``count_packets`` (the device table's size) tallies each plaintext data channel's
    packets in :attr:`Proxy.data`; a malformed packet fails the body's test there.
    ``intrude`` sends stray, duplicate and late connections once data channel 1 connects.
    """
    proxy = Proxy(upstream, faults, cut_after, count_packets, intrude)
    tasks: set[asyncio.Task[None]] = set()

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(_serve(proxy, reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        if proxy.intruders is not None:
            await proxy.intruders
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
