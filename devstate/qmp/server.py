"""The QMP wire protocol, served on a Unix socket: what a controller (libvirt, qemu.qmp) talks.

Runs in: the controller's event loop (asyncio or uvloop). Only the protocol lives here: the
greeting, capabilities negotiation, request and argument checking, replies and events. The
migration commands are handed in as a table of :class:`Command`.

One client connection is one :class:`_Session`, an asyncio Protocol::

    bytes --data_received--> JsonStream --> requests and parse errors, in order
          --> queue (reading pauses at MAX_QUEUED_REQUESTS)
          --> dispatch task: check the request, run the handler in a task of its own,
              await it through asyncio.shield, write the reply
    QmpServer.emit --> transport.write on every negotiated session (never awaits)

A handler runs in its own task, shielded from the session: when a client goes away its
dispatch task is cancelled, but the command (a migration, say) runs to completion and only
its reply is dropped. Commands of one session run one at a time, in order; sessions are
independent. As in QEMU, end of input means the client is gone: the session closes and
requests not yet started are dropped.

Framing (JSON texts, concatenated) and its resynchronisation rule: :mod:`devstate.qmp.json_stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, cast

from devstate.errors import DevstateError
from devstate.qmp.commands import (
    NO_ID,
    Command,
    Param,
    QmpError,
    check_arguments,
    encode,
    encode_reply,
    error,
    parse_request,
)
from devstate.qmp.json_stream import BadInput, JsonStream
from devstate.qmp.schema import QEMU_VERSION, schema_info

log = logging.getLogger("devstate.qmp")

# Requests parsed but not yet executed, per session; past this the session stops reading
# (QEMU's QMP_REQ_QUEUE_LEN_MAX is 8 too). One read may overshoot by what it held.
MAX_QUEUED_REQUESTS = 8
# Bytes waiting in a client's transport beyond which emit() drops the client: events are
# never waited on, so a client that does not read them must not grow memory for ever.
MAX_WRITE_BUFFER_BYTES = 4 << 20
# Connections waiting for accept(): the system's usual maximum, as servers commonly ask for.
# A unix connect finds a full backlog at once (EAGAIN for a non-blocking client) instead of
# waiting, so a small one refuses a burst of clients that connect before the loop accepts.
LISTEN_BACKLOG = socket.SOMAXCONN
# How long close() lets sessions flush what was written before dropping it.
CLOSE_FLUSH_TIMEOUT_S = 2.0


class _Session(asyncio.Protocol):
    """One client connection: parses its input, runs its commands in order, writes replies.

    Runs in: the server's event loop, as protocol callbacks plus one dispatch task that owns
    command execution. Events are written by :meth:`QmpServer.emit` directly.
    """

    def __init__(self, server: QmpServer) -> None:
        self._server = server
        self._stream = JsonStream()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writable = asyncio.Event()
        self._writable.set()
        self._transport: asyncio.Transport | None = None
        self.dispatching: asyncio.Task[None] | None = None
        self.is_negotiated = False
        self.oob = False  # the client enabled the oob capability

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, so no isinstance).
        self._transport = cast(asyncio.Transport, transport)
        if self._server._is_closed:  # accepted just before close() stopped listening
            self._transport.abort()
            return
        self._server._sessions.add(self)
        self.write(self._server._greeting)
        self.dispatching = asyncio.get_running_loop().create_task(self._dispatch_all())

    def data_received(self, data: bytes) -> None:
        for item in self._stream.feed(data):
            self._queue.put_nowait(item)
        self._pace_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._sessions.discard(self)
        if self.dispatching is not None:
            self.dispatching.cancel()  # a running command is shielded and carries on

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def write(self, line: bytes) -> None:
        """Send one encoded message, unless the connection is already going away."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(line)

    def send_event(self, line: bytes) -> None:
        """Send an event without waiting; drop the client if it lets too much pile up."""
        self.write(line)
        if self._transport is None or self._transport.is_closing():
            return
        backlog = self._transport.get_write_buffer_size()
        if backlog > MAX_WRITE_BUFFER_BYTES:
            log.warning("qmp: dropping a client that does not read its events "
                        "(%d bytes unsent)", backlog)
            self.abort()

    def abort(self) -> None:
        """Close the connection now, discarding unsent output."""
        if self._transport is not None:
            self._transport.abort()
        if self.dispatching is not None:
            self.dispatching.cancel()

    def finish(self) -> None:
        """Close the connection once what was written has gone out (a reply to ``quit``
        reaches its client), running no more of its commands."""
        if self._transport is not None:
            self._transport.close()
        if self.dispatching is not None:
            self.dispatching.cancel()

    def _pace_reading(self) -> None:
        # Stop reading while enough requests wait: a client that pipelines faster than its
        # commands run is held back by its socket buffer instead of our memory.
        if self._transport is None or self._transport.is_closing():
            return
        if self._queue.qsize() >= MAX_QUEUED_REQUESTS:
            self._transport.pause_reading()
        elif not self._transport.is_reading():
            self._transport.resume_reading()

    async def _dispatch_all(self) -> None:
        while True:
            # Wait for the client to read what we wrote before running more of its commands;
            # nothing awaits between a command's end and its reply, so no event gets ahead
            # of the reply that completes negotiation.
            await self._writable.wait()
            item = await self._queue.get()
            self._pace_reading()
            self.write(await self._answer(item))

    async def _answer(self, request: Any) -> bytes:
        if isinstance(request, BadInput):
            return encode(error("GenericError", request.desc))
        request_id = request.get("id", NO_ID) if isinstance(request, dict) else NO_ID
        try:
            parsed = parse_request(request, allow_oob=self.oob)
            command = self._server._lookup(parsed.name, self.is_negotiated)
            if parsed.oob:  # no devstate command may overtake the queue (none is OOB-safe)
                raise QmpError("GenericError", f"The command {parsed.name} does not support "
                                               "OOB")
            args = check_arguments(command, parsed.args)
            payload = await self._run(command, args)
        except QmpError as exc:
            payload = error(exc.error_class, exc.desc)
        else:
            if parsed.name == "qmp_capabilities" and "return" in payload:
                self.is_negotiated = True
                self.oob = "oob" in args.get("enable", [])
        return encode_reply(payload, request_id)

    async def _run(self, command: Command, args: dict[str, Any]) -> dict[str, Any]:
        task = asyncio.get_running_loop().create_task(self._server._execute(command, args))
        self._server._running.add(task)
        task.add_done_callback(self._server._running.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                return error("GenericError", f"command {command.name} was cancelled")
            raise


class QmpServer:
    """A QMP server on a Unix socket serving a table of commands.

    Runs in: the controller's event loop; every method must be called from it. Use as
    ``async with QmpServer(commands) as qmp: await qmp.start(path)``. ``qmp_capabilities``,
    ``query-commands``, ``query-version`` and ``query-qmp-schema`` (of the commands and of
    ``events``, the events the caller emits) are supplied unless the table has its own.
    """

    def __init__(self, commands: Iterable[Command], *,
                 version: tuple[int, int, int] = QEMU_VERSION, package: str = "devstate",
                 events: Mapping[str, tuple[Param, ...]] | None = None) -> None:
        self._commands: dict[str, Command] = {}
        for command in commands:
            if command.name in self._commands:
                raise ValueError(f"QmpServer: command {command.name} is defined twice")
            self._commands[command.name] = command
        builtins = (Command("qmp_capabilities", self._qmp_capabilities,
                            (Param("enable", list, required=False),)),
                    Command("query-commands", self._query_commands),
                    Command("query-version", self._query_version),
                    Command("query-qmp-schema", self._query_qmp_schema))
        for builtin in builtins:
            self._commands.setdefault(builtin.name, builtin)
        major, minor, micro = version
        self._version = {"qemu": {"micro": micro, "minor": minor, "major": major},
                         "package": package}
        self._events = dict(events or {})
        self._greeting = encode({"QMP": {"version": self._version, "capabilities": ["oob"]}})
        self._sessions: set[_Session] = set()
        self._running: set[asyncio.Task[dict[str, Any]]] = set()  # strong refs to commands
        self._server: asyncio.AbstractServer | None = None
        self._path = ""
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._is_closed = False

    @property
    def sessions(self) -> int:
        """How many clients are connected now."""
        return len(self._sessions)

    async def start(self, path: str | os.PathLike[str]) -> None:
        """Listen on the Unix socket ``path`` (mode 0600), replacing a stale socket file there.

        Raises OSError if the path cannot be bound (it exists and is not a socket, say).
        """
        if self._server is not None or self._is_closed:
            raise RuntimeError("QmpServer.start: the server was already started or closed")
        self._path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self._path).st_mode):
                os.unlink(self._path)  # left by a process that did not close its server
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self._path)
            # bind() created the file with the process umask, but nobody can connect before
            # listen(), which create_unix_server calls: narrowed here, it is never open to
            # others. (Changing the umask instead would race with other threads.)
            os.chmod(self._path, 0o600)
            info = os.lstat(self._path)
            self._socket_id = (info.st_dev, info.st_ino)
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _Session(self), sock=sock, backlog=LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            self._unlink_socket()
            raise

    async def close(self) -> None:
        """Stop listening, end every session (what was written still goes out) and remove the
        socket file; a no-op if closed.

        Commands still running are not cancelled: they finish and their replies are dropped.
        """
        if self._is_closed:
            return
        self._is_closed = True
        if self._server is not None:
            self._server.close()
        sessions = list(self._sessions)
        self._sessions.clear()
        for session in sessions:
            session.finish()
        await asyncio.gather(*(s.dispatching for s in sessions if s.dispatching is not None),
                             return_exceptions=True)
        try:
            # A client that stopped reading would hold its flush (and, on newer asyncio,
            # wait_closed) for ever: past the bound, its output is dropped.
            async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT_S):
                if self._server is not None:
                    await self._server.wait_closed()
        except TimeoutError:
            for session in sessions:
                session.abort()
        self._unlink_socket()

    async def __aenter__(self) -> QmpServer:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every client past negotiation, without waiting for any of them.

        Never raises because of a client; a client that lets more than
        MAX_WRITE_BUFFER_BYTES pile up unread is dropped.
        """
        now_us = time.time_ns() // 1000
        line = encode({"event": event, "data": {} if data is None else data,
                        "timestamp": {"seconds": now_us // 1_000_000,
                                      "microseconds": now_us % 1_000_000}})
        for session in list(self._sessions):
            if session.is_negotiated:
                session.send_event(line)

    def _lookup(self, name: str, is_negotiated: bool) -> Command:
        if not is_negotiated and name != "qmp_capabilities":
            raise QmpError("CommandNotFound",
                           "Expecting capabilities negotiation with 'qmp_capabilities'")
        if is_negotiated and name == "qmp_capabilities":
            raise QmpError("CommandNotFound",
                           "Capabilities negotiation is already complete, command ignored")
        try:
            return self._commands[name]
        except KeyError:
            raise QmpError("CommandNotFound", f"The command {name} has not been found") from None

    async def _execute(self, command: Command, args: dict[str, Any]) -> dict[str, Any]:
        """Run one handler; return its reply payload. Runs in: a task of its own, which a
        client going away does not cancel."""
        try:
            value = await command.handler(args)
        except QmpError as exc:
            return error(exc.error_class, exc.desc)
        except DevstateError as exc:
            return error("GenericError", str(exc))
        except Exception as exc:
            log.exception("qmp: command %s failed", command.name)
            return error("GenericError", f"internal error: {type(exc).__name__}: {exc}")
        return {"return": {} if value is None else value}

    async def _qmp_capabilities(self, args: dict[str, Any]) -> None:
        for index, capability in enumerate(args.get("enable", [])):
            if not isinstance(capability, str):
                raise QmpError("GenericError", f"Invalid parameter type for 'enable[{index}]', "
                                               "expected: string")
            if capability != "oob":
                raise QmpError("GenericError", f"Parameter 'enable[{index}]' does not accept "
                                               f"value '{capability}'")

    async def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": name} for name in self._commands]

    async def _query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._version

    async def _query_qmp_schema(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return schema_info(self._commands.values(), self._events)

    def _unlink_socket(self) -> None:
        # Only our own socket file: another server may have replaced it since.
        try:
            info = os.lstat(self._path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == self._socket_id:
            os.unlink(self._path)
