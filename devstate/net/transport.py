"""Transports under the channels: ``unix:PATH`` and ``tcp:HOST:PORT``, with TLS over tcp.

Runs in: a coordinator (listening, connecting the main channel) or a source worker
(connecting its own data channel). Everything here is raw non-blocking sockets on the
running loop (asyncio or uvloop), never asyncio streams, so that :mod:`devstate.net.fdio` can
move the bytes with plain syscalls after readiness waits::

    destination                                 source
    Listener(parse_uri(uri)).open()
    sock = await listener.accept()      <---    sock = await connect(address)
    sock = await tls_server(sock, tls)  <-->    sock = await tls_client(sock, tls, name)
    fdio.recv_exactly / fdio.send_all on ``sock``, plain or TLS alike

TLS is a wrapper applied after connecting, not a transport of its own: the URI says where,
:class:`TlsConfig` says how to authenticate. Both are small picklable values (file paths,
not ``SSLContext`` objects) so a worker process can build its own context.

A TLS session lives in the process that did the handshake: its keys and the bytes OpenSSL
has buffered are not in the fd, so a TLS socket cannot be handed to another process by fd
passing the way a plain one can; the process that will use it must do the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass, replace
from types import TracebackType

from devstate.errors import ChannelError, DevstateError
from devstate.net import fdio

TRANSPORTS = ("unix", "tcp")

# Connections waiting for accept(); the destination accepts one main and one data channel
# per worker, so this only needs to cover a burst of workers connecting at once.
LISTEN_BACKLOG = 64

# A peer that connected must say who it is (its hello) promptly; a silent one is dropped,
# not waited on. Sized for a source across a slow WAN, far above a hello's round trip.
HELLO_TIMEOUT_S = 5.0

# How long a unix connect to a listener whose backlog is full waits before trying again
# (the kernel reports EAGAIN rather than letting the connect complete later).
UNIX_RETRY_S = 0.01


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed channel URI: a unix socket path, or a tcp host and port."""

    transport: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


def parse_uri(uri: str) -> Address:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (HOST a name, IPv4, or ``[IPv6]``), QEMU's
    forms; the URL forms ``tcp://HOST:PORT`` and ``unix://PATH`` mean the same.

    Port 0 is accepted: a listener then takes any free port (see :attr:`Listener.address`).
    """
    transport, sep, rest = uri.partition(":")
    if not sep or transport not in TRANSPORTS:
        raise DevstateError(f"channel URI {uri!r}: unknown transport {transport!r}; expected "
                            "unix:PATH or tcp:HOST:PORT")
    # People used to URLs write tcp://host:port; QEMU's form has no slashes. Read both.
    rest = rest.removeprefix("//")
    if transport == "unix":
        if not rest:
            raise DevstateError(f"channel URI {uri!r}: empty path; expected unix:PATH")
        return Address("unix", path=rest)
    host, port = _split_host_port(uri, rest)
    return Address("tcp", host=host, port=_parse_port(uri, port))


def _split_host_port(uri: str, rest: str) -> tuple[str, str]:
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket:
            raise DevstateError(f"channel URI {uri!r}: missing ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DevstateError(f"channel URI {uri!r}: {host!r} is not an IPv6 address") from None
        if not after.startswith(":"):
            raise DevstateError(f"channel URI {uri!r}: missing port; expected tcp:[V6]:PORT")
        return host, after[1:]
    host, sep, port = rest.rpartition(":")
    if not sep:
        raise DevstateError(f"channel URI {uri!r}: missing port; expected tcp:HOST:PORT")
    if ":" in host:
        raise DevstateError(f"channel URI {uri!r}: an IPv6 address must be in brackets, "
                            "e.g. tcp:[::1]:4444")
    if not host:
        # QEMU reads "tcp::PORT" as every address; devstate asks for it to be said.
        raise DevstateError(f"channel URI {uri!r}: empty host; expected tcp:HOST:PORT "
                            "(0.0.0.0 or [::] for every address)")
    return host, port


def _parse_port(uri: str, text: str) -> int:
    # int() would also take " 80", "+80" and "8_0".
    if not text.isascii() or not text.isdigit():
        raise DevstateError(f"channel URI {uri!r}: port {text!r} is not a number"
                            if text else f"channel URI {uri!r}: missing port")
    port = int(text)
    if port > 65535:
        raise DevstateError(f"channel URI {uri!r}: port {port} is out of range (0-65535)")
    return port


class Listener:
    """The destination's listening socket.

    A unix socket gets mode 0600 (only its owner may connect) and replaces a stale socket
    file, never one a process still listens on (:func:`refuse_live_socket`); a tcp one
    listens on the URI's host (its first address when a name has several).
    ``hello_timeout_s`` bounds how long a connection may take to send its hello.
    """

    def __init__(self, address: Address, *, hello_timeout_s: float = HELLO_TIMEOUT_S) -> None:
        if not hello_timeout_s > 0:
            raise DevstateError(f"hello timeout {hello_timeout_s:g} s: must be above 0")
        self._address = address
        self.hello_timeout_s = hello_timeout_s
        self._sock: socket.socket | None = None
        self._unlink = False

    @property
    def address(self) -> Address:
        """The address as bound: after :meth:`open`, port 0 is the port actually taken."""
        return self._address

    def open(self) -> None:
        """Bind and listen, non-blocking."""
        if self._sock is not None:
            raise ChannelError(f"listener on {self._address} is already open")
        try:
            if self._address.transport == "unix":
                self._sock = self._open_unix()
            else:
                self._sock = self._open_tcp()
        except OSError as exc:
            raise ChannelError(f"cannot listen on {self._address}: "
                               f"{exc.strerror or exc}") from exc

    def _open_unix(self) -> socket.socket:
        path = self._address.path
        refuse_live_socket(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            self._unlink = True
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _open_tcp(self) -> socket.socket:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            self._address.host, self._address.port, type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Set before listen so that accepted sockets' window scale fits the buffers.
            fdio.tune_for_bulk(sock)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            self._address = replace(self._address, port=sock.getsockname()[1])
        except BaseException:
            sock.close()
            raise
        return sock

    async def accept(self) -> socket.socket:
        """The next connection: non-blocking, tuned for bulk, TCP_NODELAY on tcp."""
        while True:
            if self._sock is None:
                raise ChannelError(f"listener on {self._address} is not open")
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                await fdio.wait_readable(self._sock)
                continue
            except ConnectionAbortedError:
                continue  # reset by its peer before we took it: nothing to accept
            try:
                _tune(conn)
            except BaseException:
                conn.close()
                raise
            return conn

    def close(self) -> None:
        """Stop listening; a unix listener removes its socket file. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._unlink:
            self._unlink = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._address.path)

    def __enter__(self) -> Listener:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def refuse_live_socket(path: str) -> None:
    """Raise :class:`ChannelError` if a process listens on the unix socket ``path``;
    return if nothing is there, or only a stale file (a socket left by a process that was
    killed), which the caller then unlinks and binds anew.

    Replacing a live socket would silently cut its process (another ``devstate vm``) off
    from its clients. The check reads the kernel's table of listening sockets rather than
    connecting, because a connection is not harmless: a destination takes the first one
    as its migration's main channel. The table is this network namespace's: a listener in
    another namespace sharing the file system is not seen.
    """
    if {path, os.path.abspath(path)} & _listening_unix_paths():
        raise ChannelError(f"cannot listen on {path}: another process is listening on it "
                           "(stop that one, or choose another path)")


# /proc/net/unix's flag of a socket that listens (the kernel's __SO_ACCEPTCON).
_ACCEPTCON = 0x10000


def _listening_unix_paths() -> set[str]:
    """The paths unix sockets listen on in this network namespace (as they were bound)."""
    paths = set()
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
        next(table)  # the header
        for line in table:
            # Num RefCount Protocol Flags Type St Inode [Path]; a path may hold spaces.
            fields = line.rstrip("\n").split(maxsplit=7)
            if len(fields) == 8 and int(fields[3], 16) & _ACCEPTCON:
                paths.add(fields[7])
    return paths


def _tune(sock: socket.socket) -> None:
    """Make a connected socket ready for fdio: non-blocking, bulk buffers, no Nagle delay."""
    sock.setblocking(False)
    fdio.tune_for_bulk(sock)
    if sock.family != socket.AF_UNIX:
        # Packets are batched by the sender already; Nagle would only delay the last one.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect(address: Address, *, timeout_s: float = 10.0) -> socket.socket:
    """Connect to a destination (plaintext); the socket comes back non-blocking.

    A tcp host with several addresses is tried address by address, within one timeout.
    """
    try:
        async with asyncio.timeout(timeout_s):
            if address.transport == "unix":
                return await _connect_one(socket.AF_UNIX, address.path)
            return await _connect_tcp(address)
    except TimeoutError:
        raise ChannelError(f"cannot connect to {address}: "
                           f"timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise ChannelError(f"cannot connect to {address}: {exc.strerror or exc}") from exc


async def _connect_tcp(address: Address) -> socket.socket:
    infos = await asyncio.get_running_loop().getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, _, _, _, sockaddr in infos:
        try:
            return await _connect_one(family, sockaddr)
        except OSError as exc:
            error = exc
    assert error is not None  # getaddrinfo raises rather than return nothing
    raise error


async def _connect_one(family: int, sockaddr: str | tuple[object, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _tune(sock)  # before connect, so the tcp handshake announces the window scale
        while True:
            err = sock.connect_ex(sockaddr)
            if err == errno.EAGAIN and family == socket.AF_UNIX:
                await asyncio.sleep(UNIX_RETRY_S)  # backlog full; unix connects don't wait
                continue
            if err == errno.EINPROGRESS:
                await fdio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            return sock
    except BaseException:
        sock.close()
        raise


def peer_name(sock: socket.socket) -> str:
    """The peer for messages: host:port on tcp, the socket path (if any) on unix."""
    try:
        name = sock.getpeername()
    except OSError:
        return "the peer"
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(name) or "the peer"
