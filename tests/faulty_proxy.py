"""A TCP proxy in front of a destination that breaks chosen channels on purpose.

Every devstate channel opens with a plaintext hello naming its kind and index, so the
proxy can tell channels apart even when the rest is TLS. Per channel it can pass the bytes
through, answer a TLS handshake with garbage, refuse it (close at once), or cut it after
a number of bytes from the source. Runs in: the test's event loop, beside the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from devstate import wire
from devstate.errors import ProtocolError


class Fault(enum.Enum):
    """What happens to a channel."""

    GARBAGE = "garbage"  # answer with bytes that are no TLS handshake
    REFUSE = "refuse"    # close as soon as the hello is read
    CUT = "cut"          # forward, then close both ends after ``cut_after`` bytes


@dataclass
class Proxy:
    """Where the proxy listens, what it does, and what it saw."""

    upstream: tuple[str, int]
    faults: dict[tuple[wire.ChannelKind, int], Fault]
    cut_after: int = 4 << 20
    port: int = 0
    seen: list[tuple[wire.ChannelKind, int]] = field(default_factory=list)

    @property
    def uri(self) -> str:
        """The URI the source should migrate to."""
        return f"tcp:127.0.0.1:{self.port}"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                limit: int | None) -> None:
    moved = 0
    try:
        while data := await reader.read(1 << 16):
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
    up_reader, up_writer = await asyncio.open_connection(*proxy.upstream)
    up_writer.write(first)
    limit = proxy.cut_after if fault is Fault.CUT else None
    await asyncio.gather(_pipe(reader, up_writer, limit), _pipe(up_reader, writer, limit))


@contextlib.asynccontextmanager
async def faulty_proxy(upstream: tuple[str, int],
                       faults: dict[tuple[wire.ChannelKind, int], Fault],
                       cut_after: int = 4 << 20) -> AsyncIterator[Proxy]:
    """Run a proxy to ``upstream`` on a free port of 127.0.0.1 for the body's duration."""
    proxy = Proxy(upstream, faults, cut_after)
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
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
