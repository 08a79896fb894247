"""Non-blocking socket I/O on the running event loop, without the loop's ``sock_*`` API.

uvloop's ``sock_recv_into``/``sock_sendall`` measured at less than half the throughput of a
plain non-blocking call after a readiness wait (shared/reference/python-runtime-notes.md,
A3), so the hot paths wait for readiness with ``add_reader``/``add_writer`` and then call
``recv_into``/``sendmsg`` directly. Every function here runs in: whichever process owns the
socket, on its running loop; the socket must be non-blocking.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence

# Linux caps one sendmsg at IOV_MAX (1024) buffers.
IOV_MAX = 1024


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
    """Receive at least one byte into ``view``; return the count, 0 at end of stream."""
    while True:
        try:
            return sock.recv_into(view)
        except BlockingIOError:
            await wait_readable(sock)


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
