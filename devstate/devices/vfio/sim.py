"""``vfio-sim``: a simulated VFIO device, driven through its own device-model process.

Runs in: the worker process that owns the device, on its event loop (uvloop or asyncio).
The device itself lives in a child process (:mod:`devstate.devices.vfio.model`) reached as a
VFIO device is: a control socket carrying the ioctls' stand-ins
(:class:`~devstate.devices.vfio.uapi.Request` / :class:`~devstate.devices.vfio.uapi.Reply`)
and, per session, a data socket the model hands over with SCM_RIGHTS.

Every wait is a readiness wait on the running loop, so the devices of one worker overlap:
one device's firmware latency (spent in its model while ``load_end`` awaits the reply)
never delays another. A model that dies closes its sockets, so pending and later calls
raise :class:`~devstate.errors.DeviceError` instead of hanging.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket

from devstate.config.spec import DeviceSpec
from devstate.devices.base import StreamDevice
from devstate.devices.vfio.process import ModelProcess
from devstate.devices.vfio.uapi import (
    SAVING_GROUP,
    MigrationFlags,
    ModelConfig,
    Op,
    PrecopyInfo,
    Reply,
    Request,
    VfioState,
)
from devstate.errors import DeviceError
from devstate.net import fdio

# A cold model start imports numpy: ~0.2 s warm, seconds on a cold page cache, and more
# than 10 s seen on this 2-core host while another VM's 512 vCPUs resumed (the libvirt
# flow's second destination, started as the source rolled back).
OPEN_TIMEOUT_S = 30.0


class VfioSimDevice(StreamDevice):
    """A ``vfio-sim`` device: a VFIO migration v2 device behind a model process.

    Its state is seeded by the machine seed and the device name, or, if ``incoming``, blank
    (zero bytes) until a load fills it.
    """

    def __init__(self, spec: DeviceSpec, machine_seed: int, *, incoming: bool = False
                 ) -> None:
        super().__init__(spec, machine_seed)
        if spec.vfio is None:
            raise ValueError(f"{spec.id}: a vfio-sim device needs a VFIO spec")
        self._vfio = spec.vfio
        self._incoming = incoming
        self._model: ModelProcess | None = None
        self._closing: asyncio.Future[None] | None = None
        self._control: socket.socket | None = None
        self._data: socket.socket | None = None
        self._state = VfioState.RUNNING  # as of the last reply
        self._seq = 0
        # One request in flight at a time: replies come in order, and one reader at a time
        # may wait on the control socket.
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        """The device model's pid while it is open."""
        return None if self._model is None else self._model.pid

    @property
    def state(self) -> VfioState:
        """The device's migration state as of its last reply."""
        return self._state

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Start the device model and wait until it says hello. Idempotent."""
        if self._model is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._model = ModelProcess(self.id, self._config(), theirs)
        except BaseException:
            ours.close()
            raise
        ours.setblocking(False)
        self._control = ours
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                await self._receive("open", seq=0)
        except TimeoutError:
            await self.close()
            raise DeviceError(self.id, f"open: the device model sent no hello within "
                                       f"{OPEN_TIMEOUT_S:g} s", errno.ETIMEDOUT) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Ask the model to quit, kill it if it does not, reap it, close every fd.

        Idempotent, safe after a failed :meth:`open`, and single-flight: a close that
        starts while another runs (a cancelled open closing as its worker shuts down)
        waits for that one instead of closing the same fds under it.
        """
        if self._closing is None or self._closing.done():
            self._closing = asyncio.ensure_future(self._close_once())
        await asyncio.shield(self._closing)

    async def _close_once(self) -> None:
        model, self._model = self._model, None
        try:
            if model is not None:
                await model.stop(self._control)
        finally:
            self._close_data()
            if self._control is not None:
                self._control.close()
                self._control = None

    def _config(self) -> ModelConfig:
        flags = MigrationFlags.STOP_COPY | MigrationFlags.P2P
        if self._vfio.precopy:
            flags |= MigrationFlags.PRE_COPY
        return ModelConfig(name=self._vfio.name, size=self._vfio.size, seed=self.machine_seed,
                           read_bandwidth=self._vfio.read_bandwidth,
                           write_bandwidth=self._vfio.write_bandwidth,
                           firmware_latency_ms=self._vfio.firmware_latency_ms, flags=flags,
                           incoming=self._incoming, owner_pid=os.getpid(),
                           dirty_rate=self._vfio.dirty_rate)

    # ------------------------------------------------------------------ StreamDevice

    async def digest(self) -> bytes:
        """xxh3_128 of the device state, computed by the model (cached per state version)."""
        return (await self._call("digest", Op.GET_DIGEST)).digest

    async def stop(self) -> None:
        """-> STOP (from RUNNING: via RUNNING_P2P)."""
        await self._set_state("stop", VfioState.STOP)

    async def resume(self) -> None:
        """-> RUNNING from any state but ERROR; the model walks the combination path."""
        await self._set_state("resume", VfioState.RUNNING)

    async def save_begin(self) -> None:
        """-> STOP_COPY: a new save session (or, from PRE_COPY, the rest of the same one)."""
        await self._set_state("save_begin", VfioState.STOP_COPY)
        self._require_data("save_begin")

    async def save_read(self, out: memoryview) -> int:
        """Read the next stream bytes into ``out`` (not empty); 0 once the whole state is read."""
        return await self._read("save_read", out)

    async def save_end(self) -> None:
        """STOP_COPY -> STOP: the save session ends; the device keeps its state."""
        await self._set_state("save_end", VfioState.STOP)

    async def load_begin(self) -> None:
        """-> RESUMING: a new load session.

        A device fresh from :meth:`open` is RUNNING; the model walks RUNNING -> RUNNING_P2P
        -> STOP -> RESUMING, as the uAPI's combination transitions allow.
        """
        await self._set_state("load_begin", VfioState.RESUMING)
        self._require_data("load_begin")

    async def load_write(self, data: memoryview) -> None:
        """Write all of ``data`` to the load session, in order."""
        sock = self._require_data("load_write")
        try:
            await fdio.send_all(sock, [data])
        except OSError as exc:
            raise self._stream_broke("load_write", exc) from exc

    async def load_end(self) -> None:
        """RESUMING -> STOP: returns once the model validated the stream and its firmware
        latency passed; :class:`DeviceError` (EINVAL, device in ERROR) if the stream was
        incomplete or inconsistent."""
        await self._set_state("load_end", VfioState.STOP)

    async def reset(self) -> None:
        """VFIO_DEVICE_RESET: -> RUNNING, ending any session; the way out of ERROR."""
        await self._call("reset", Op.RESET)

    # ------------------------------------------------------------------ precopy

    async def precopy_begin(self) -> None:
        """-> PRE_COPY: a new save session streaming the initial bytes while running."""
        await self._set_state("precopy_begin", VfioState.PRE_COPY)
        self._require_data("precopy_begin")

    async def precopy_info(self) -> PrecopyInfo:
        """Initial and dirty bytes the device has yet to produce (PRE_COPY* only)."""
        reply = await self._call("precopy_info", Op.GET_PRECOPY_INFO)
        if reply.errno:
            raise DeviceError(self.id, f"precopy_info: {reply.detail}", reply.errno)
        return PrecopyInfo(reply.initial_bytes, reply.dirty_bytes)

    @property
    def supports_precopy(self) -> bool:  # type: ignore[override]
        """Whether the device was made with PRE_COPY (the spec's ``precopy``)."""
        return self._vfio.precopy

    async def precopy_remaining(self) -> int:
        """Initial and dirty bytes still to come while running."""
        info = await self.precopy_info()
        return info.initial_bytes + info.dirty_bytes

    async def precopy_read(self, out: memoryview) -> int:
        """Read precopy bytes into ``out`` (not empty).

        Raises ``OSError(ENOMSG)`` at a temporary end of stream: nothing to read and the
        device has no initial or dirty bytes left to produce.
        """
        sock = self._require_data("precopy_read", out)
        while True:
            count = await self._read_queued("precopy_read", sock, out)
            if count is not None:
                return count
            info = await self.precopy_info()
            if not info.initial_bytes and not info.dirty_bytes:
                # What the device wrote before it answered is queued to us by now.
                count = await self._read_queued("precopy_read", sock, out)
                if count is None:
                    raise OSError(errno.ENOMSG, "precopy_read: no precopy data for now; "
                                                "more comes only when state is dirtied")
                return count
            await fdio.wait_readable(sock)

    async def data_size(self) -> int:
        """Estimated bytes a STOP_COPY from now would stream (VFIO_DEVICE_FEATURE_MIG_DATA_SIZE)."""
        return (await self._call("data_size", Op.GET_DATA_SIZE)).data_size

    # ------------------------------------------------------------------ control channel

    async def _set_state(self, what: str, new: VfioState) -> None:
        before = self._state
        reply = await self._call(what, Op.SET_STATE, new)
        if reply.errno:
            now = f"; the device is now {reply.state.name}" if reply.state != before else ""
            raise DeviceError(self.id, f"{what}: {before.name} -> {new.name} refused: "
                                       f"{reply.detail}{now}", reply.errno)

    async def _call(self, what: str, op: Op, arg: int = 0) -> Reply:
        """Send one request and return its reply (whatever its errno)."""
        async with self._lock:
            if self._control is None:
                raise DeviceError(self.id, f"{what}: the device is not open", errno.ENODEV)
            self._seq += 1
            try:
                await fdio.send_all(self._control, [Request(self._seq, op, arg).pack()])
            except OSError as exc:
                raise self._model_lost(what) from exc
            return await self._receive(what, self._seq)

    async def _receive(self, what: str, seq: int) -> Reply:
        """Read replies until the one for ``seq``.

        Earlier ones belong to callers that were cancelled while waiting; each still
        updates the known state and data session, as the device really went there.
        """
        assert self._control is not None
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._control, Reply.MAX_BYTES, 1,
                                                  socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                await fdio.wait_readable(self._control)
                continue
            except OSError as exc:
                raise self._model_lost(what) from exc
            if not data:
                raise self._model_lost(what)
            try:
                reply = Reply.unpack(data)
            except ValueError as exc:
                for fd in fds:
                    os.close(fd)
                raise DeviceError(self.id, f"{what}: malformed reply from the device model: "
                                           f"{exc}", errno.EPROTO) from exc
            self._absorb(reply, fds[0] if fds else None)
            if reply.seq == seq:
                return reply

    def _absorb(self, reply: Reply, fd: int | None) -> None:
        """Track the state a reply reports, and the data session it opens or ends."""
        self._state = reply.state
        if fd is not None:
            self._close_data()
            self._data = socket.socket(fileno=fd)
            self._data.setblocking(False)
        elif reply.state not in SAVING_GROUP and reply.state is not VfioState.RESUMING:
            self._close_data()

    def _model_lost(self, what: str) -> DeviceError:
        return DeviceError(self.id, f"{what}: the device model {self._model_fate()}",
                           errno.ENODEV)

    def _model_fate(self) -> str:
        return "closed its control socket" if self._model is None else self._model.fate()

    # ------------------------------------------------------------------ data channel

    def _require_data(self, what: str, out: memoryview | None = None) -> socket.socket:
        """The open session's data socket (and, to read into, a non-empty ``out``)."""
        if out is not None and not len(out):
            # recv_into an empty buffer returns 0, which would read as the end of stream.
            raise DeviceError(self.id, f"{what}: the buffer to read into is empty",
                              errno.EINVAL)
        if self._data is None:
            raise DeviceError(self.id, f"{what}: no data session is open (the device is "
                                       f"{self._state.name})", errno.EBADF)
        return self._data

    def _close_data(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    async def _read(self, what: str, out: memoryview) -> int:
        sock = self._require_data(what, out)
        try:
            count = await fdio.recv_some(sock, out)
        except OSError as exc:
            raise self._stream_broke(what, exc) from exc
        if not count:
            await self._confirm_end(what)
        return count

    async def _read_queued(self, what: str, sock: socket.socket, out: memoryview) -> int | None:
        """One non-blocking read; None if nothing is queued."""
        try:
            count = sock.recv_into(out)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise self._stream_broke(what, exc) from exc
        if not count:
            await self._confirm_end(what)
        return count

    async def _confirm_end(self, what: str) -> None:
        """Make sure an end of stream is the device's and not its death.

        A killed model's data socket ends too; only a model that still answers ended it on
        purpose, so a truncated stream is never taken for the whole state.
        """
        await self._call(what, Op.GET_STATE)

    def _stream_broke(self, what: str, exc: OSError) -> DeviceError:
        fate = ""
        if self._model is not None and self._model.exited:
            fate = f"; the device model {self._model_fate()}"
        return DeviceError(self.id, f"{what}: the data stream broke ({exc.strerror}){fate}",
                           exc.errno)
