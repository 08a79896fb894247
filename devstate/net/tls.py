"""TLS on a channel: who authenticates how (TlsConfig), and the handshake on a socket.

Runs in: coordinators (the main channel) and workers (data channels). The handshake runs
on a non-blocking socket through :mod:`devstate.net.fdio`, so a worker can run it on the
channel it adopted.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from devstate.errors import ChannelError
from devstate.net import fdio
from devstate.net.transport import peer_name


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """How one side authenticates a TLS channel: PEM file paths and the checks to make.

    ``ca`` signs the peer's certificate. ``cert`` (with ``key``, unless the cert file holds
    it) is our certificate chain: the destination must have one; a source has one for
    mutual TLS, which the destination asks for with ``verify_client``. ``hostname`` is the
    name a source checks in the destination's certificate; None means the URI's host.
    """

    ca: str
    cert: str | None = None
    key: str | None = None
    hostname: str | None = None
    verify_client: bool = False

    def client_context(self) -> ssl.SSLContext:
        """A source's context: verify the destination's certificate and name."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        self._configure(ctx)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """A destination's context: present our certificate; verify the client's if asked."""
        if self.cert is None:
            raise ChannelError("TLS: the destination needs a certificate (cert)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_client else ssl.CERT_NONE
        # Sessions are never resumed, and a ticket the client never reads would sit unread
        # in its receive buffer, turning its close into a reset.
        ctx.num_tickets = 0
        self._configure(ctx)
        return ctx

    def _configure(self, ctx: ssl.SSLContext) -> None:
        # TLS 1.3 is negotiated when both sides have it (the default maximum); 1.2 remains
        # for older peers. Renegotiation (1.2 only) is refused: it would let a read need the
        # socket to be writable while a send waits on it too (fdio keeps one waiter each).
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        _load(ctx.load_verify_locations, "CA file", self.ca)
        if self.cert is not None:
            _load(ctx.load_cert_chain, "certificate", self.cert, self.key)
        elif self.key is not None:
            raise ChannelError("TLS: a key was given without its certificate (cert)")


def _load(method: Callable[..., None], what: str, *paths: str | None) -> None:
    try:
        method(*paths)
    except ssl.SSLError as exc:
        raise ChannelError(f"TLS: cannot load {what} {paths[0]!r}: "
                           f"{fdio.ssl_reason(exc)}") from exc
    except OSError as exc:
        raise ChannelError(f"TLS: cannot load {what} {paths[0]!r}: "
                           f"{exc.strerror or exc}") from exc


async def tls_client(sock: socket.socket, tls: TlsConfig, server_hostname: str, *,
                     timeout_s: float = 10.0) -> ssl.SSLSocket:
    """Do a source's TLS handshake on a connected socket; check ``server_hostname``.

    The caller passes ``tls.hostname or address.host``. ``sock`` is taken over: on failure
    it is closed and :class:`ChannelError` says "TLS handshake" and why.
    """
    return await _handshake(sock, tls, server_hostname, timeout_s)


async def tls_server(sock: socket.socket, tls: TlsConfig, *,
                     timeout_s: float = 10.0) -> ssl.SSLSocket:
    """Do a destination's TLS handshake on an accepted socket.

    ``sock`` is taken over: on failure it is closed and :class:`ChannelError` says
    "TLS handshake" and why.
    """
    return await _handshake(sock, tls, None, timeout_s)


async def _handshake(sock: socket.socket, tls: TlsConfig, server_hostname: str | None,
                     timeout_s: float) -> ssl.SSLSocket:
    peer = peer_name(sock)
    try:
        ctx = tls.client_context() if server_hostname is not None else tls.server_context()
        # suppress_ragged_eofs=False: a close without close_notify is a truncation to
        # report (fdio turns it into ConnectionError), not an end of stream.
        tsock = ctx.wrap_socket(sock, server_side=server_hostname is None,
                                server_hostname=server_hostname,
                                do_handshake_on_connect=False, suppress_ragged_eofs=False)
    except BaseException:
        sock.close()
        raise
    try:
        async with asyncio.timeout(timeout_s):
            await _drive_handshake(tsock)
    except BaseException as exc:
        tsock.close()
        if isinstance(exc, TimeoutError):
            raise ChannelError(f"TLS handshake with {peer} failed: "
                               f"timed out after {timeout_s:g} s") from None
        if isinstance(exc, OSError):
            reason = (fdio.ssl_reason(exc) if isinstance(exc, ssl.SSLError)
                      else exc.strerror or str(exc))
            raise ChannelError(f"TLS handshake with {peer} failed: {reason}") from exc
        raise
    return tsock


async def _drive_handshake(tsock: ssl.SSLSocket) -> None:
    while True:
        try:
            tsock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await fdio.wait_readable(tsock)
        except ssl.SSLWantWriteError:
            await fdio.wait_writable(tsock)
