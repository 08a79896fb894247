"""Channels between the two sides: opening them (TLS included), hellos and control messages.

Runs in: a coordinator (main channel, accepting data channels) or a worker (connecting or
adopting its own data channels). One main channel carries control messages; each data
channel belongs to one worker on each side, which sends or receives on it directly.

Addresses, listeners and TLS are :mod:`devstate.net.transport`'s. Every channel opens with a
plaintext hello (migration id, kind, index): the destination's coordinator routes the
connection by it before any TLS, since a TLS session cannot move between processes. With
TLS whoever owns the channel (the coordinator for the main one, a worker for a data one)
then runs the handshake and the hello is sent again inside TLS, where it must match: the
plaintext one only routes, the encrypted one authenticates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import uuid
from collections.abc import Iterator
from typing import Any

from devstate.errors import ChannelError, DevstateError, PeerFailed, ProtocolError, describe
from devstate.net import fdio, transport
from devstate.net.tls import TlsConfig, tls_client, tls_server
from devstate.net.transport import HELLO_TIMEOUT_S, Address, Listener, parse_uri, peer_name
from devstate.protocol import wire
from devstate.protocol.control import Control, M, decode_as

__all__ = ["Address", "Channel", "Listener", "TlsConfig", "parse_uri", "open_channel",
           "secure_accepted", "adopt_channel", "accept_source", "read_hello", "hello",
           "send_control", "recv_control", "expect_control", "checked", "send", "expect"]

log = logging.getLogger("devstate.net.channels")

# The destination adopts channels one after another once it has checked the HELLO: seconds
# are generous, but a destination that never adopts a channel must not hang the source.
ECHO_TIMEOUT_S = 30.0

Channel = socket.socket | ssl.SSLSocket


def _server_name(address: Address, tls: TlsConfig) -> str:
    return tls.hostname or address.host or "localhost"


@contextlib.contextmanager
def _closed_on_failure(held: list[Channel], what: str) -> Iterator[None]:
    """Close ``held[0]`` (a socket, or the TLS socket that took it over) if the body fails;
    socket errors become :class:`ChannelError` prefixed with ``what``."""
    try:
        yield
    except (OSError, ConnectionError) as exc:
        held[0].close()
        raise ChannelError(f"{what}: {exc}") from exc
    except BaseException:
        held[0].close()
        raise


async def open_channel(address: Address, hello_bytes: bytes, tls: TlsConfig | None) -> Channel:
    """Source: connect a channel and send its hello (again inside TLS, with ``tls``)."""
    held: list[Channel] = [await transport.connect(address)]
    with _closed_on_failure(held, str(address)):
        await fdio.send_all(held[0], [hello_bytes])
        if tls is not None:
            held[0] = await tls_client(held[0], tls, _server_name(address, tls))
            await fdio.send_all(held[0], [hello_bytes])
        # The destination echoes the hello once the channel is adopted: a refused, stray
        # or broken channel shows here, at setup, not as a stall later.
        echo = bytearray(len(hello_bytes))
        try:
            async with asyncio.timeout(ECHO_TIMEOUT_S):
                if not await fdio.recv_exactly(held[0], memoryview(echo)):
                    raise ChannelError(f"{address}: closed by the destination before "
                                       "adopting the channel (its log says why: a TLS "
                                       "mismatch, another migration, a duplicate)")
        except TimeoutError:
            raise ChannelError(f"{address}: not adopted within {ECHO_TIMEOUT_S:.0f} s") from None
        if echo != hello_bytes:
            raise ProtocolError("hello", "the destination echoed another hello")
    return held[0]


async def secure_accepted(sock: socket.socket, hello_bytes: bytes,
                          tls: TlsConfig | None) -> Channel:
    """Destination: adopt an accepted channel whose plaintext hello was ``hello_bytes``:
    with ``tls``, run the handshake and check the hello sent again inside it; then echo the
    hello, which tells the source the channel is ours."""
    held: list[Channel] = [sock]
    with _closed_on_failure(held, "adopting a channel"):
        offered = wire.decode_hello(hello_bytes).tls
        if offered != (tls is not None):  # refused at once, not after a handshake timeout
            raise ProtocolError("hello.flags", "this destination requires TLS; the source "
                                               "offered plaintext" if tls is not None else
                                "the source asked for TLS; this destination has no "
                                "certificate (--tls-cert)")
        if tls is not None:
            held[0] = await tls_server(sock, tls)
            inner = await read_hello(held[0])
            if wire.pack_hello(inner) != hello_bytes:
                raise ProtocolError("hello", f"channel {inner.index}: the hello inside TLS "
                                             "differs from the one that routed it")
        await fdio.send_all(held[0], [hello_bytes])
    return held[0]


async def adopt_channel(fd: int, hello_bytes: bytes, tls: TlsConfig | None) -> Channel:
    """Destination worker: take over an accepted data channel passed as ``fd``."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return await secure_accepted(sock, hello_bytes, tls)


async def accept_source(listener: Listener) -> tuple[socket.socket, wire.Hello]:
    """Destination: the first connection on ``listener`` whose hello is a main channel's,
    with that hello (read: the caller continues after it).

    Anything else that connects first (a port scanner, an HTTP client, a peer that never
    speaks, a stale source's data channel) is a stranger: logged in one line and closed,
    while the listener keeps listening. Each connection has ``listener.hello_timeout_s``
    for its hello, read concurrently with the others', so a silent stranger cannot hold
    the real source back. Only a failure of the listener itself raises.
    """
    adopted: asyncio.Queue[tuple[socket.socket, wire.Hello]] = asyncio.Queue()
    screening: set[asyncio.Task[None]] = set()

    async def accept_all() -> None:
        while True:
            conn = await listener.accept()
            task = asyncio.create_task(_screen(conn, listener.hello_timeout_s, adopted))
            screening.add(task)
            task.add_done_callback(screening.discard)

    accepting = asyncio.create_task(accept_all())
    first = asyncio.create_task(adopted.get())
    try:
        await asyncio.wait((accepting, first), return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            accepting.result()  # raises the listener's error
        return first.result()
    except BaseException:  # cancelled while a source was being adopted: close it
        if first.done() and not first.cancelled():
            first.result()[0].close()
        raise
    finally:
        tasks = (accepting, first, *screening)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not adopted.empty():  # a second main channel screened at the same moment
            adopted.get_nowait()[0].close()


async def _screen(conn: socket.socket, timeout_s: float,
                  adopted: asyncio.Queue[tuple[socket.socket, wire.Hello]]) -> None:
    """Queue ``conn`` with its hello if it opens a main channel; else log and close it."""
    try:
        hello = await read_hello(conn, timeout_s=timeout_s)
        if hello.kind is not wire.ChannelKind.MAIN:
            raise ProtocolError("hello.kind", f"a {hello.kind.name.lower()} channel "
                                              "before any main channel")
    except (DevstateError, OSError) as exc:
        log.warning("dropped a connection from %s: %s", peer_name(conn), describe(exc))
        conn.close()
        return
    except BaseException:  # cancelled: the source was adopted, or the caller gave up
        conn.close()
        raise
    adopted.put_nowait((conn, hello))


async def read_hello(sock: socket.socket, *, timeout_s: float = HELLO_TIMEOUT_S) -> wire.Hello:
    """Read and decode a channel's hello, within ``timeout_s``."""
    buf = bytearray(wire.HELLO_BYTES)
    try:
        async with asyncio.timeout(timeout_s):
            if not await fdio.recv_exactly(sock, memoryview(buf)):
                raise ChannelError("peer closed before its hello")
    except TimeoutError:
        raise ChannelError(f"no hello within {timeout_s:g} s") from None
    except ConnectionError as exc:
        raise ChannelError(f"hello: {exc}") from exc
    return wire.decode_hello(buf)


def hello(kind: wire.ChannelKind, index: int, channels: int, migration_id: uuid.UUID, *,
          tls: bool = False) -> bytes:
    """The bytes of a hello (``tls``: the channel runs TLS after it)."""
    return wire.pack_hello(wire.Hello(kind, index, channels, migration_id, tls))


async def send_control(sock: socket.socket, kind: wire.ControlType, body: dict[str, Any]) -> None:
    """Send one control message on the main channel."""
    try:
        await fdio.send_all(sock, [wire.pack_control(kind, body)])
    except OSError as exc:
        raise ChannelError(f"main channel: sending {kind.name} failed: {exc}") from exc


async def send(sock: socket.socket, message: Control) -> None:
    """Send one typed control message on the main channel."""
    await send_control(sock, message.kind, message.body())


async def expect(sock: socket.socket, cls: type[M]) -> M:
    """Receive the control message ``cls``; FAILED from the peer raises."""
    return decode_as(cls, await expect_control(sock, cls.kind))


async def recv_control(sock: socket.socket) -> tuple[wire.ControlType, dict[str, Any]]:
    """Receive one control message; a closed channel raises :class:`ChannelError`."""
    header = bytearray(wire.CONTROL_HEADER_BYTES)
    try:
        if not await fdio.recv_exactly(sock, memoryview(header)):
            raise ChannelError("main channel closed by the peer")
        kind, length, checksum = wire.decode_control_header(header)
        body = bytearray(length)
        if length and not await fdio.recv_exactly(sock, memoryview(body)):
            raise ChannelError(f"main channel closed inside a {kind.name} message")
    except ConnectionError as exc:
        raise ChannelError(f"main channel: {exc}") from exc
    return kind, wire.decode_control_body(body, checksum)


async def expect_control(sock: socket.socket, *kinds: wire.ControlType) -> dict[str, Any]:
    """Receive one control message of one of ``kinds``; FAILED from the peer raises."""
    return checked(*await recv_control(sock), *kinds)


def checked(kind: wire.ControlType, body: dict[str, Any],
            *kinds: wire.ControlType) -> dict[str, Any]:
    """``body``, if ``kind`` is one of ``kinds``; FAILED raises :class:`PeerFailed`, any
    other kind :class:`ProtocolError`."""
    if kind is wire.ControlType.FAILED:
        raise PeerFailed(str(body.get("reason", "(no reason given)")),
                         not_running=body.get("running") is False)
    if kind not in kinds:
        raise ProtocolError("control.type", f"got {kind.name}, expected "
                                            f"{' or '.join(k.name for k in kinds)}")
    return body
