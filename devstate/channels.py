"""Channels between the two sides: opening them (TLS included), hellos and control messages.

Runs in: a coordinator (main channel, accepting data channels) or a worker (connecting or
adopting its own data channels). One main channel carries control messages; each data
channel belongs to one worker on each side, which sends or receives on it directly.

Addresses, listeners and TLS are :mod:`devstate.transport`'s. Every channel opens with a
plaintext hello (migration id, kind, index): the destination's coordinator routes the
connection by it before any TLS, since a TLS session cannot move between processes. With
TLS the channel's worker then runs the handshake itself and the hello is sent again inside
TLS, where it must match: the plaintext one only routes, the encrypted one authenticates.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from typing import Any

from devstate import fdio, transport, wire
from devstate.errors import ChannelError, ProtocolError
from devstate.transport import Address, Listener, TlsConfig, parse_uri

__all__ = ["Address", "Listener", "TlsConfig", "parse_uri", "open_main_channel",
           "accept_main_channel", "open_data_channel", "adopt_data_channel", "read_hello",
           "hello", "send_control", "recv_control", "expect_control"]

# A peer that connected must say who it is promptly; a silent one is dropped, not waited on.
HELLO_TIMEOUT_S = 5.0

Channel = socket.socket | ssl.SSLSocket


def _server_name(address: Address, tls: TlsConfig) -> str:
    return tls.hostname or address.host or "localhost"


async def open_main_channel(address: Address, tls: TlsConfig | None) -> Channel:
    """Source: connect the main channel (its hello is the caller's to send)."""
    sock = await transport.connect(address)
    if tls is None:
        return sock
    return await transport.tls_client(sock, tls, _server_name(address, tls))


async def accept_main_channel(sock: socket.socket, tls: TlsConfig | None) -> Channel:
    """Destination: the accepted main channel, after the TLS handshake if ``tls``."""
    if tls is None:
        return sock
    return await transport.tls_server(sock, tls)


async def open_data_channel(address: Address, hello_bytes: bytes,
                            tls: TlsConfig | None) -> Channel:
    """Source worker: connect one data channel and send its hello (twice over TLS)."""
    sock = await transport.connect(address)
    try:
        await fdio.send_all(sock, [hello_bytes])
    except OSError as exc:
        sock.close()
        raise ChannelError(f"data channel to {address}: sending its hello: {exc}") from exc
    if tls is None:
        return sock
    secured = await transport.tls_client(sock, tls, _server_name(address, tls))
    try:
        await fdio.send_all(secured, [hello_bytes])
    except OSError as exc:
        secured.close()
        raise ChannelError(f"data channel to {address}: sending its hello: {exc}") from exc
    return secured


async def adopt_data_channel(fd: int, hello_bytes: bytes, tls: TlsConfig | None) -> Channel:
    """Destination worker: take over an accepted data channel whose plaintext hello was
    ``hello_bytes``; over TLS, handshake and check the hello sent again inside."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    if tls is None:
        return sock
    secured = await transport.tls_server(sock, tls)
    try:
        inner = await read_hello(secured)
        if wire.pack_hello(inner) != hello_bytes:
            raise ProtocolError("hello", f"channel {inner.index}: the hello inside TLS differs "
                                         "from the one that routed it")
    except BaseException:
        secured.close()
        raise
    return secured


async def read_hello(sock: socket.socket) -> wire.Hello:
    """Read and decode a channel's hello, within HELLO_TIMEOUT_S."""
    buf = bytearray(wire.HELLO_BYTES)
    try:
        async with asyncio.timeout(HELLO_TIMEOUT_S):
            if not await fdio.recv_exactly(sock, memoryview(buf)):
                raise ChannelError("peer closed before its hello")
    except TimeoutError:
        raise ChannelError(f"no hello within {HELLO_TIMEOUT_S:.0f} s") from None
    except ConnectionError as exc:
        raise ChannelError(f"hello: {exc}") from exc
    return wire.decode_hello(buf)


def hello(kind: wire.ChannelKind, index: int, channels: int,
          migration_id: uuid.UUID) -> bytes:
    """The bytes of a hello."""
    return wire.pack_hello(wire.Hello(kind, index, channels, migration_id))


async def send_control(sock: socket.socket, kind: wire.ControlType, body: dict[str, Any]) -> None:
    """Send one control message on the main channel."""
    try:
        await fdio.send_all(sock, [wire.pack_control(kind, body)])
    except OSError as exc:
        raise ChannelError(f"main channel: sending {kind.name} failed: {exc}") from exc


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
    kind, body = await recv_control(sock)
    if kind is wire.ControlType.FAILED:
        raise ChannelError(f"peer failed: {body.get('reason', '(no reason given)')}")
    if kind not in kinds:
        raise ProtocolError("control.type", f"got {kind.name}, expected "
                                            f"{' or '.join(k.name for k in kinds)}")
    return body
