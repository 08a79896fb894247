"""Non-blocking socket I/O on the running event loop, without the loop's ``sock_*`` API.

uvloop's ``sock_recv_into``/``sock_sendall`` measured at less than half the throughput of a
plain non-blocking call after a readiness wait (shared/reference/python-runtime-notes.md,
A3), so the hot paths wait for readiness with ``add_reader``/``add_writer`` and then call
``recv_into``/``sendmsg`` directly. Every function here runs in: whichever process owns the
socket, on its running loop; the socket must be non-blocking.

TLS: an ``ssl.SSLSocket`` (made by :mod:`devstate.net.transport`) goes through the same
functions. Its reads and writes report "would block" as ``ssl.SSLWantReadError`` or
``ssl.SSLWantWriteError`` (not ``BlockingIOError`` subclasses), either of which can need
the *other* direction's readiness. It has no ``sendmsg``, so :func:`send_all` coalesces
small buffers into one ``send`` (one TLS record instead of one per packet). A broken TLS
stream, including a close without ``close_notify`` (a truncation an attacker could cause),
comes out as :class:`ConnectionError`; a clean ``close_notify`` reads as end of stream.
Plain sockets keep their ``recv_into``/``sendmsg`` fast path untouched.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence

# Linux caps one sendmsg at IOV_MAX (1024) buffers.
IOV_MAX = 1024

# TLS coalescing: buffers under TLS_SMALL_BYTES are copied together into sends of up to about
# TLS_BATCH_BYTES. Each send is cut into 16 KiB records anyway, so a bigger batch buys only
# fewer calls, while the copy costs memory bandwidth; large buffers (1 MiB chunks) go as
# they are, without a copy.
TLS_SMALL_BYTES = 16 << 10
TLS_BATCH_BYTES = 256 << 10


def watch_blocking(fd: int, callback: Callable[..., object], *args: object) -> None:
    """Call ``callback(*args)`` when ``fd`` is readable, keeping ``fd`` in blocking mode.

    For pipes read and written whole-message at a time (multiprocessing Connections):
    uvloop's ``add_reader`` switches the fd to non-blocking, which breaks a Connection's
    recv/send of a message that is not yet complete; readiness polling does not need it.
    """
    asyncio.get_running_loop().add_reader(fd, callback, *args)
    os.set_blocking(fd, True)


# Socket buffers for bulk state (data channels, device data fds): a 1 MiB chunk then moves
# in one or two syscalls instead of five or more at the default ~208 KiB, which halves
# wake-ups when many processes share few cores.
BULK_BUFFER_BYTES = 4 << 20


def tune_for_bulk(sock: socket.socket) -> None:
    """Enlarge a bulk-transfer socket's buffers (the kernel caps them at its rmem/wmem max)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BULK_BUFFER_BYTES)


async def wait_readable(sock: socket.socket) -> None:
    """Wait until ``sock`` is readable (data, EOF or error)."""
    await _wait(sock, readable=True)


async def wait_writable(sock: socket.socket) -> None:
    """Wait until ``sock`` can take more bytes (or has an error to report)."""
    await _wait(sock, readable=False)


async def _wait(sock: socket.socket, *, readable: bool) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = sock.fileno()
    if fd < 0:
        raise ConnectionAbortedError("socket is closed")
    add, remove = ((loop.add_reader, loop.remove_reader) if readable
                   else (loop.add_writer, loop.remove_writer))

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, ready)
    try:
        await fut
    finally:
        remove(fd)


async def recv_some(sock: socket.socket, view: memoryview) -> int:
    """Receive at least one byte into ``view``; return the count, 0 at end of stream.

    On TLS, bytes OpenSSL has already decrypted are returned without waiting: only a
    "want" error, which means its buffer is empty, leads to a readiness wait.
    """
    while True:
        try:
            return sock.recv_into(view)
        except (BlockingIOError, ssl.SSLWantReadError):
            await wait_readable(sock)
        except ssl.SSLWantWriteError:
            await wait_writable(sock)
        except ssl.SSLZeroReturnError:
            return 0  # the peer's close_notify: a clean end
        except ssl.SSLError as exc:
            raise ConnectionError(f"TLS stream broken: {ssl_reason(exc)}") from exc


async def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` completely; False if the peer closed before the first byte.

    A close after some but not all bytes raises :class:`ConnectionError`: a truncated
    message is never mistaken for a clean end.
    """
    got = 0
    total = len(view)
    while got < total:
        n = await recv_some(sock, view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError(f"peer closed after {got} of {total} bytes")
        got += n
    return True


async def send_all(sock: socket.socket, buffers: Sequence[memoryview | bytes]) -> None:
    """Send every byte of ``buffers`` in order with as few ``sendmsg`` calls as possible."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    if isinstance(sock, ssl.SSLSocket):
        for data in _coalesced(pending):
            await _send_tls(sock, data)
        return
    first = 0
    while first < len(pending):
        try:
            sent = sock.sendmsg(pending[first:first + IOV_MAX])
        except BlockingIOError:
            await wait_writable(sock)
            continue
        while sent:
            head = pending[first]
            if sent >= len(head):
                sent -= len(head)
                first += 1
            else:
                pending[first] = head[sent:]
                sent = 0


def _coalesced(views: Sequence[memoryview]) -> Iterator[memoryview | bytes]:
    """``views`` in order, runs of small ones joined into batches of about TLS_BATCH_BYTES."""
    run: list[memoryview] = []
    size = 0
    for view in views:
        if len(view) >= TLS_SMALL_BYTES:
            if run:
                yield _joined(run)
                run, size = [], 0
            yield view
            continue
        run.append(view)
        size += len(view)
        if size >= TLS_BATCH_BYTES:
            yield _joined(run)
            run, size = [], 0
    if run:
        yield _joined(run)


def _joined(run: list[memoryview]) -> memoryview | bytes:
    return run[0] if len(run) == 1 else b"".join(run)


async def _send_tls(sock: ssl.SSLSocket, data: memoryview | bytes) -> None:
    """Send all of ``data`` on a TLS socket.

    After a "want" error OpenSSL requires the retry to pass the same bytes (it has already
    encrypted part of them), so ``view`` only moves on after a successful send.
    """
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            await wait_writable(sock)
            continue
        except ssl.SSLWantReadError:
            await wait_readable(sock)
            continue
        except ssl.SSLError as exc:
            raise ConnectionError(f"TLS stream broken: {ssl_reason(exc)}") from exc
        view = view[sent:]


def ssl_reason(exc: ssl.SSLError) -> str:
    """An ssl error as a person reads it: the verify message, else the text without its
    ``[SSL: CODE]`` prefix and ``(_ssl.c:NNN)`` suffix."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return "the peer closed the connection without a TLS close_notify"
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    text = re.sub(r"^\[SSL(: \w+)?\]\s*", "", text)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text) or type(exc).__name__
