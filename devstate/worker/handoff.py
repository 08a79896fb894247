"""Handoffs between the workers of one side: a slot's place moves, its bytes stay put.

Runs in: every worker of a pool with more than one worker. The coordinator gives each pair
of workers one ``SOCK_SEQPACKET`` socketpair (a *link*); every worker maps the whole arena,
so a note naming a slot's offset and length is all another worker needs to read it.

Notes (40 bytes each, many per message; a link keeps message order)::

    op u8 | kind u8 | gen u16 | channel u16 | reserved u16 | device u32 | seq u32 |
    length u32 | reserved u32 | offset u64 | checksum u64

* ``SEND``     source: put the packet in my slot at ``offset`` on your ``channel``
* ``QUEUED``   source: the SEND of (device, seq) is in its channel's queue
* ``RELEASE``  either side: my slot at ``offset`` that you lent me is free again
* ``DONE``     source: I will send no more SENDs this migration
* ``SENT``     source: ``device``'s stream read its last byte (:mod:`devstate.planning.admission`)
* ``DELIVER``  destination: a verified packet of a device you own, in my slot at ``offset``
* ``LOADED``   destination: ``device``, which others load after, is loaded here

A slot is lent, never given: its lender gets it back by RELEASE, so each worker still only
ever allocates from its own partition. ``gen`` numbers the Save or Load a note belongs to:
notes of a cancelled one that arrive late are dropped, never applied to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

log = logging.getLogger("devstate.worker.handoff")

_NOTE = struct.Struct("<BBHHHIIIIQQ")
NOTE_BYTES = _NOTE.size
# Notes per message: 1024 x 40 B stays well inside a Unix socket's default send buffer.
MAX_BATCH = 1024


class Op(enum.IntEnum):
    """What a note asks of the worker it reaches."""

    SEND = 1
    QUEUED = 2
    RELEASE = 3
    DONE = 4
    DELIVER = 5
    LOADED = 6
    SENT = 7


class Note(NamedTuple):
    """One decoded note."""

    op: int
    kind: int
    gen: int
    channel: int
    device: int
    seq: int
    length: int
    offset: int
    checksum: int


# handler(peer, note); note None: the link to ``peer`` closed (that worker is gone).
Handler = Callable[[int, Note | None], None]


class Mesh:
    """This worker's links to the other workers of its side."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self._links: dict[int, socket.socket] = {}
        self._out: dict[int, list[bytes]] = {}
        self._blocked: set[int] = set()
        self._flush_scheduled = False
        self._gen = 0
        self._handler: Handler | None = None
        self._backlog: list[tuple[int, Note | None]] = []

    @property
    def peers(self) -> tuple[int, ...]:
        """The other workers this one is linked to."""
        return tuple(sorted(self._links))

    def join(self, peer: int, fd: int) -> None:
        """Adopt this worker's end of the link to ``peer`` (an fd passed by the coordinator)."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        self._links[peer] = sock
        self._out[peer] = []
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable, peer)

    def serve(self, gen: int, handler: Handler) -> None:
        """Route notes of operation ``gen`` to ``handler``, starting with any already here."""
        self._gen = gen & 0xFFFF
        self._handler = handler
        backlog, self._backlog = self._backlog, []
        for peer, note in backlog:
            if note is None or note.gen == self._gen:
                handler(peer, note)

    def stop(self) -> None:
        """No handler until the next :meth:`serve`; notes arriving meanwhile wait for it."""
        self._handler = None

    def send(self, peer: int, op: Op, *, kind: int = 0, channel: int = 0, device: int = 0,
             seq: int = 0, length: int = 0, offset: int = 0, checksum: int = 0,
             gen: int | None = None) -> None:
        """Queue a note to ``peer``; notes queued in one loop pass leave in one message.

        ``gen`` is the operation the note belongs to (default: the one being served): a
        reply that goes out late, after its operation ended, must not count in the next.
        """
        stamp = self._gen if gen is None else gen & 0xFFFF
        self._out[peer].append(_NOTE.pack(op, kind, stamp, channel, 0, device, seq, length,
                                          0, offset, checksum))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def broadcast(self, op: Op, *, device: int = 0) -> None:
        """Queue the same note (an op, and the device it is about) to every peer."""
        for peer in self._links:
            self.send(peer, op, device=device)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for peer, out in self._out.items():
            if peer in self._blocked:
                continue
            sock = self._links[peer]
            while out:
                batch = out[:MAX_BATCH]
                try:
                    sock.send(b"".join(batch))
                except BlockingIOError:
                    self._blocked.add(peer)
                    asyncio.get_running_loop().add_writer(sock.fileno(), self._unblock, peer)
                    break
                except OSError as exc:  # the peer is gone: its reader reports it
                    log.debug("link to worker %d: %s", peer, exc)
                    out.clear()
                    break
                del out[:len(batch)]

    def _unblock(self, peer: int) -> None:
        asyncio.get_running_loop().remove_writer(self._links[peer].fileno())
        self._blocked.discard(peer)
        self._flush()

    def _on_readable(self, peer: int) -> None:
        sock = self._links[peer]
        while True:
            try:
                data = sock.recv(NOTE_BYTES * MAX_BATCH)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._unwatch(sock)
                self._dispatch(peer, None)
                return
            for fields in _NOTE.iter_unpack(data):
                op, kind, gen, channel, _, device, seq, length, _, offset, checksum = fields
                self._dispatch(peer, Note(op, kind, gen, channel, device, seq, length, offset,
                                          checksum))

    def _dispatch(self, peer: int, note: Note | None) -> None:
        if self._handler is None:
            self._backlog.append((peer, note))
        elif note is None or note.gen == self._gen:
            self._handler(peer, note)

    def _unwatch(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(sock.fileno())
        with contextlib.suppress(OSError, ValueError):
            loop.remove_writer(sock.fileno())

    def close(self) -> None:
        """Close every link. Idempotent."""
        for sock in self._links.values():
            self._unwatch(sock)
            sock.close()
        self._links.clear()
        self._out.clear()


async def raise_when_set(fault: asyncio.Future[None]) -> None:
    """Turn a failure a note handler noticed into a task failure (ending the run's
    TaskGroup): handlers are callbacks, with no task of their own to raise in."""
    await fault

