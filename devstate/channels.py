"""Channels between the two sides: addresses, the listener, hellos and control messages.

Runs in: a coordinator (main channel, accepting data channels) or a source worker
(connecting its own data channel). One main channel carries control messages; each data
channel belongs to one worker on each side, which sends or receives on it directly.

Addresses use QEMU's URI style. This module speaks ``unix:PATH``; TCP and TLS come with
the transport issue and plug in here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from devstate import fdio, wire
from devstate.errors import ChannelError, DevstateError, ProtocolError

# A peer that connected must say who it is promptly; a silent one is dropped, not waited on.
HELLO_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed channel URI."""

    transport: str
    path: str

    def __str__(self) -> str:
        return f"{self.transport}:{self.path}"


def parse_uri(uri: str) -> Address:
    """Parse ``unix:PATH`` (the only transport of this version)."""
    transport, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise DevstateError(f"channel URI {uri!r}: expected 'unix:PATH'")
    if transport != "unix":
        raise DevstateError(f"channel URI {uri!r}: transport {transport!r} is not supported "
                            "yet (only unix:PATH)")
    return Address("unix", rest)


class Listener:
    """The destination's listening socket (mode 0600: only its owner may connect)."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self._sock: socket.socket | None = None

    def open(self) -> None:
        """Bind and listen; a stale socket file at the path is replaced."""
        path = self.address.path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ChannelError(f"cannot listen on {self.address}: {exc.strerror}") from exc
        self._sock = sock

    async def accept(self) -> socket.socket:
        """The next connection, non-blocking."""
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                await fdio.wait_readable(self._sock)
                continue
            conn.setblocking(False)
            fdio.tune_for_bulk(conn)
            return conn

    def close(self) -> None:
        """Stop listening and remove the socket file. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.path)


async def connect(address: Address) -> socket.socket:
    """Connect to a destination; the socket comes back non-blocking."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    fdio.tune_for_bulk(sock)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address.path)
    except OSError as exc:
        sock.close()
        raise ChannelError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    return sock


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
