"""The ``vfio-sim`` device model: one process per simulated VFIO device.

Runs in: its own process, started by :class:`devstate.devices.vfio.sim.VfioSimDevice` as
``python -m devstate.devices.vfio.model --control-fd N --config JSON``. Single-threaded: one
``selectors`` loop serves the control socket and, while a session is open, the data socket,
so control requests are answered while a stream flows. It plays the part of a VFIO variant
driver behind the migration uAPI v2 (:mod:`devstate.devices.vfio.uapi`)::

    client (owner worker)                          this process
    control fd, SOCK_SEQPACKET -- Request ------>  next_path() -> arcs -> session effects
                               <-- Reply (+fd) -
    data fd, SOCK_STREAM, one per session <------  save stream, paced to read_bandwidth
                                          ------>  resume stream, paced to write_bandwidth

The device state and the stream format live in :mod:`devstate.devices.vfio.state`, the
save and resume sessions in :mod:`devstate.devices.vfio.session`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from devstate.devices.vfio.resume import ResumeSession
from devstate.devices.vfio.session import SaveSession, StreamRejected
from devstate.devices.vfio.state import (
    BLANK_GENERATION,
    ChunkContent,
    DeviceState,
    chunk_count,
    stream_bytes,
)
from devstate.devices.vfio.uapi import (
    PRECOPY_STATES,
    InvalidTransition,
    ModelConfig,
    Op,
    Reply,
    Request,
    Session,
    VfioState,
    next_path,
    session_effect,
)
from devstate.lifecycle import end_with_parent
from devstate.net.fdio import tune_for_bulk


class ProtocolViolation(Exception):
    """The owner sent something that is not a request: a bug to report, not to serve."""


class DeviceModel:
    """One simulated device: its FSM state, its device state and at most one session."""

    def __init__(self, config: ModelConfig, control: socket.socket) -> None:
        self._config = config
        self._control = control
        first = BLANK_GENERATION if config.incoming else 0
        self._state = DeviceState(ChunkContent(config.seed, config.name), config.size,
                                  np.full(chunk_count(config.size), first, np.uint32))
        self._fsm = VfioState.RUNNING
        self._session: SaveSession | ResumeSession | None = None
        self._selector = selectors.DefaultSelector()
        self._watching: tuple[socket.socket, int] | None = None
        self._handlers: dict[Op, Callable[[Request], tuple[Reply, socket.socket | None]]] = {
            Op.SET_STATE: self._set_state, Op.GET_STATE: self._get_state,
            Op.GET_DATA_SIZE: self._get_data_size, Op.GET_PRECOPY_INFO: self._get_precopy_info,
            Op.GET_DIGEST: self._get_digest, Op.RESET: self._reset}

    def run(self) -> None:
        """Say hello, then serve until the owner quits or goes away."""
        self._selector.register(self._control, selectors.EVENT_READ)
        try:
            if not self._send(Reply(0, Op.HELLO, self._fsm, flags=self._config.flags)):
                return
            while True:
                wake_at = self._watch_data(time.monotonic())
                timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._control:
                        if not self._serve_one():
                            return
                    elif self._session is not None and key.fileobj is self._session.sock:
                        self._session.on_ready(time.monotonic())
        finally:
            self._end_session()
            self._selector.close()

    def _watch_data(self, now: float) -> float | None:
        """Register the session socket for what it wants now; return its pacing wake-up."""
        want: tuple[socket.socket, int] | None = None
        wake_at = None
        if self._session is not None:
            events, wake_at = self._session.interest(now)
            if events:
                want = (self._session.sock, events)
        if want != self._watching:
            if self._watching is not None:
                self._selector.unregister(self._watching[0])
            if want is not None:
                self._selector.register(*want)
            self._watching = want
        return wake_at

    def _serve_one(self) -> bool:
        """Answer one request; False when the model should exit (QUIT, or the owner left)."""
        try:
            data = self._control.recv(Reply.MAX_BYTES)  # room to see an oversized request
        except ConnectionResetError:
            return False
        if not data:  # EOF: the owner closed the control socket or died
            return False
        try:
            request = Request.unpack(data)
        except ValueError as exc:
            raise ProtocolViolation(f"malformed control request: {exc}") from exc
        if request.op is Op.QUIT:
            return False
        handler = self._handlers.get(request.op)
        if handler is None:
            return self._send(self._reply(request, errno=errno.EINVAL,
                                          detail=f"{request.op.name} is not a request"))
        reply, data_sock = handler(request)
        try:
            return self._send(reply, data_sock)
        finally:
            if data_sock is not None:
                data_sock.close()  # the owner has its own copy now

    def _send(self, reply: Reply, data_sock: socket.socket | None = None) -> bool:
        """Send a reply (with the client's end of a new session); False if the owner left."""
        try:
            if data_sock is None:
                self._control.send(reply.pack())
            else:
                socket.send_fds(self._control, [reply.pack()], [data_sock.fileno()])
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _reply(self, request: Request, **fields: Any) -> Reply:
        return Reply(request.seq, request.op, self._fsm, **fields)

    def _set_state(self, request: Request) -> tuple[Reply, socket.socket | None]:
        """Walk the combination path arc by arc, like a driver's set_state loop."""
        try:
            new = VfioState(request.arg)
        except ValueError:
            return self._reply(request, errno=errno.EINVAL,
                               detail=f"unknown state {request.arg}"), None
        try:
            path = next_path(self._fsm, new, self._config.flags)
        except InvalidTransition as exc:
            return self._reply(request, errno=exc.errno, detail=exc.strerror), None
        data_sock = None
        for nxt in path[1:]:
            try:
                data_sock = self._take_arc(nxt)  # only a path's last arc can open a session
            except StreamRejected as exc:
                # The uAPI lets a failed arc leave the device in ERROR; only RESET recovers.
                self._end_session()
                self._fsm = VfioState.ERROR
                return self._reply(request, errno=errno.EINVAL, detail=str(exc)), None
            self._fsm = nxt
        return self._reply(request), data_sock

    def _take_arc(self, dst: VfioState) -> socket.socket | None:
        """Do what the arc ``self._fsm -> dst`` does; the client's end of a new session."""
        effect = session_effect(self._fsm, dst)
        if effect.opens:
            return self._open_session(save=effect is Session.OPEN_SAVE,
                                      precopy=dst in PRECOPY_STATES)
        if effect is Session.KEEP and dst is VfioState.STOP_COPY:
            assert isinstance(self._session, SaveSession)
            self._session.enter_stop_copy()
        elif effect is Session.END_RESUME:
            self._finish_resume()
        if effect.ends:
            self._end_session()
        return None

    def _open_session(self, *, save: bool, precopy: bool) -> socket.socket:
        assert self._session is None  # every arc into an opening state ended the last one
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            tune_for_bulk(end)
        ours.setblocking(False)
        now = time.monotonic()
        config = self._config
        gc.disable()  # a session streams at GB/s: no collection pauses until it ends
        self._session = (
            SaveSession(self._state, ours, config.read_bandwidth, precopy=precopy, now=now,
                        dirty_rate=config.dirty_rate)
            if save else ResumeSession(self._state, ours, config.write_bandwidth, now))
        return theirs

    def _finish_resume(self) -> None:
        assert isinstance(self._session, ResumeSession)
        content, generations, digest = self._session.finish()
        time.sleep(self._config.firmware_latency_ms / 1000)  # the firmware digesting it
        self._state.adopt(content, generations, digest)

    def _end_session(self) -> None:
        if self._watching is not None:
            self._selector.unregister(self._watching[0])
            self._watching = None
        if self._session is not None:
            self._session.close()
            self._session = None
            gc.enable()

    def _get_state(self, request: Request) -> tuple[Reply, None]:
        return self._reply(request), None

    def _get_data_size(self, request: Request) -> tuple[Reply, None]:
        size = (self._session.remaining_bytes() if isinstance(self._session, SaveSession)
                else stream_bytes(self._state.size))
        return self._reply(request, data_size=size), None

    def _get_precopy_info(self, request: Request) -> tuple[Reply, None]:
        if self._fsm not in PRECOPY_STATES:
            return self._reply(request, errno=errno.EINVAL,
                               detail=f"no precopy info in {self._fsm.name}"), None
        assert isinstance(self._session, SaveSession)
        info = self._session.precopy_info()
        return self._reply(request, initial_bytes=info.initial_bytes,
                           dirty_bytes=info.dirty_bytes), None

    def _get_digest(self, request: Request) -> tuple[Reply, None]:
        return self._reply(request, digest=self._state.digest()), None

    def _reset(self, request: Request) -> tuple[Reply, None]:
        # The state stays the last valid one: a failed load never adopted anything.
        self._end_session()
        self._fsm = VfioState.RUNNING
        return self._reply(request), None


def main(argv: list[str] | None = None) -> int:
    """Entry point of a device-model process."""
    parser = argparse.ArgumentParser(prog="python -m devstate.devices.vfio.model")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--config", required=True, help="ModelConfig as JSON")
    args = parser.parse_args(argv)
    config = ModelConfig.from_json(args.config)
    end_with_parent(config.owner_pid)
    # The model stands for the device's own hardware, not for its owner's work: do not
    # inherit the owner worker's CPU pinning (the kernel keeps this within our cpuset).
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    # Ctrl-C belongs to the coordinator; the model ends with its owner (QUIT, EOF, SIGKILL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with socket.socket(fileno=args.control_fd) as control:
        try:
            model = DeviceModel(config, control)
            gc.freeze()  # what exists now lives as long as the model: keep it out of GC walks
            model.run()
        except ProtocolViolation as exc:
            print(f"vfio_model {config.name}: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
