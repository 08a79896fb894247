"""The other design, as a baseline: a private thread, event loop and channel per device.

Runs in: the source is the process that calls :func:`migrate`; the destination is
``python -m benches.per_device_threads``, a child it starts, which inherits the far ends
of the channels (socket pairs) as file descriptors.

This is the seed thread's first proposal ("a separate channel and thread for each VFIO
device"). QEMU 10 kept its thread per device (a save job and a load thread each) but moved
the bytes onto multifd's shared channels; here the channel stays private too. Each VFIO
device gets a thread of its own running its own uvloop (the vfio-sim client is async) and
a Unix stream socket of its own; the vCPUs travel, as in QEMU, in the main migration
stream, got and put by the main thread. No pool, no arena, no per-packet checksum, no
recovery (a failure closes both sides): plain bytes behind a length. Socket I/O uses
devstate's own primitives (:mod:`devstate.net.fdio`) and buffer sizes, so the two runtimes
differ in design, not in how a syscall is made::

    source process                                         destination process
    main thread:  get each vCPU -> VCPU    ==== main ====>  main thread: put each vCPU
    thread nic0:  save_read -> frames      ==== nic0 ====>  thread nic0: load_write, load_end
    thread nic1:  ...                      ==== nic1 ====>  thread nic1: ...

Sequence (main channel messages in capitals)::

    setup   both sides open their devices; the destination puts its VFIO devices in
            RESUMING (load_begin) and starts each one's receive loop; READY ->
    t0      stop: every device thread saves its device (save_begin, save_read until 0,
            save_end) onto its channel; the main thread gets every vCPU onto the main one
            <- LOADED (every vCPU put, every device's load_end returned: firmware paid)
            COMMIT -> the destination resumes its devices
            <- RESUMED, received at t1: downtime = t1 - t0 on the source's clock, the same
               end points as devstate's (devstate.migration.source); LOADED's arrival is kept too
    after   DIGESTS -> (every device's digest() here); <- REPORT (the ids that differ)

Frames: on a device channel ``length u32 | bytes``, a length of 0 ending the device's
state; on the main channel ``kind u32 | length u32 | bytes``. All little-endian; lengths
are bounded before anything is allocated for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from devstate.config.spec import Backend, MachineConfig, parse_spec
from devstate.devices import DeviceHost, RecordDevice, StreamDevice, device_table, make_device
from devstate.errors import DevstateError, describe
from devstate.lifecycle import no_gc_pauses
from devstate.net import fdio

# The same stream packet size as devstate's default (MigrationParams.chunk_bytes).
CHUNK_BYTES = 1 << 20
# The destination imports numpy and starts a device model per VFIO device before READY.
READY_TIMEOUT_S = 60.0
# Any one step after READY (a device's whole save or load, a reply): generous, but no hang.
STEP_TIMEOUT_S = 60.0
# A device model quits at once, or is killed after devstate's own grace (vfio_sim).
CLOSE_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 20.0
# Control messages carry at most a digest per device; a bound on what a peer makes us read.
MAX_MESSAGE_BYTES = 4 << 20

_LENGTH = struct.Struct("<I")
_MESSAGE = struct.Struct("<II")
_REPO = Path(__file__).resolve().parent.parent


class Kind(enum.IntEnum):
    """What a main-channel message is."""

    READY = 1      # dest -> source: devices open and RESUMING, receive loops running
    VCPU = 2       # source -> dest: one vCPU record, in device-table order
    VCPUS_END = 3  # source -> dest: no more vCPU records
    LOADED = 4     # dest -> source: every device put and completed
    COMMIT = 5     # source -> dest: resume
    RESUMED = 6    # dest -> source: every device resumed
    DIGESTS = 7    # source -> dest: JSON {device id: digest hex}
    REPORT = 8     # dest -> source: JSON {"checked": n, "mismatched": [ids]}
    ERROR = 9      # dest -> source: UTF-8 text, then the destination exits


class BaselineError(DevstateError):
    """Raised when a baseline migration fails; the message names the side and the step."""


@dataclass(frozen=True, slots=True)
class BaselineReport:
    """One baseline migration. Times are ms from the source's stop (t0), its clock."""

    downtime_ms: float  # to RESUMED received (devstate's resumed_seen_ms)
    loaded_ms: float    # to LOADED received
    saved_ms: float     # to the last byte of every device sent
    devices: int
    bytes: int          # state bytes moved, all devices
    checked: int        # devices whose digests the destination compared
    mismatched: tuple[str, ...]

    @property
    def verified(self) -> bool:
        """True when every device's digest is the same on both sides."""
        return self.checked == self.devices and not self.mismatched


class DeviceThread:
    """One VFIO device with its own thread, event loop and channel; owns all three.

    Every call on the device runs on this thread's loop (:meth:`submit`); the main thread
    only waits on the futures. :meth:`close` cancels whatever still runs there, closes the
    device (its model process), stops and joins the thread and closes the channel.
    Idempotent.
    """

    def __init__(self, device: StreamDevice, channel: socket.socket) -> None:
        self.device = device
        self.channel = channel
        channel.setblocking(False)  # fdio waits for readiness on the device's loop
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"device {device.id}")
        self._closed = False

    def __enter__(self) -> DeviceThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on this device's loop; the future of its result."""
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread.is_alive():
                self.submit(self._shutdown).result(CLOSE_TIMEOUT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()
            self.channel.close()

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not current]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await self.device.close()


def wait_all(what: str, futures: Sequence[Future[Any]], ids: Sequence[str],
             timeout_s: float = STEP_TIMEOUT_S) -> list[Any]:
    """Results of ``futures`` (one per device of ``ids``); the first failure, named."""
    deadline = time.monotonic() + timeout_s
    results = []
    for future, device_id in zip(futures, ids, strict=True):
        try:
            results.append(future.result(max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            raise BaselineError(f"{what} {device_id}: no result within {timeout_s:g} s") \
                from None
        except Exception as exc:
            raise BaselineError(f"{what} {device_id}: {describe(exc)}") from exc
    return results


# ---------------------------------------------------------------- device channels

async def save_stream(device: StreamDevice, channel: socket.socket) -> int:
    """Runs in: the device's thread. Stop-and-copy one device onto its channel; its bytes."""
    chunk = memoryview(bytearray(CHUNK_BYTES))
    total = 0
    await device.save_begin()
    while True:
        filled = 0
        while filled < CHUNK_BYTES:
            n = await device.save_read(chunk[filled:])
            if n == 0:
                break
            filled += n
        await fdio.send_all(channel, [_LENGTH.pack(filled), chunk[:filled]])
        total += filled
        if filled < CHUNK_BYTES:  # a short chunk is the last one; 0 ends the state
            if filled:
                await fdio.send_all(channel, [_LENGTH.pack(0)])
            break
    await device.save_end()
    return total


async def load_stream(device: StreamDevice, channel: socket.socket) -> int:
    """Runs in: the device's thread. Write the device's frames in order, then complete its
    load (firmware latency included); the bytes loaded."""
    chunk = memoryview(bytearray(CHUNK_BYTES))
    header = memoryview(bytearray(_LENGTH.size))
    total = 0
    while True:
        if not await fdio.recv_exactly(channel, header):
            raise BaselineError(f"the source closed {device.id}'s channel after {total} B")
        (length,) = _LENGTH.unpack(header)
        if length == 0:
            break
        if length > CHUNK_BYTES:
            raise BaselineError(f"frame of {length} B on {device.id}'s channel "
                                f"(at most {CHUNK_BYTES})")
        if not await fdio.recv_exactly(channel, chunk[:length]):
            raise BaselineError(f"{device.id}'s channel ended inside a frame")
        await device.load_write(chunk[:length])
        total += length
    await device.load_end()
    return total


async def prepare_load(device: StreamDevice) -> None:
    """Runs in: the device's thread. Open the incoming device and enter RESUMING."""
    await device.open()
    await device.load_begin()


# ---------------------------------------------------------------- main channel

def send(main: socket.socket, kind: Kind, payload: bytes | memoryview = b"") -> None:
    main.sendall(_MESSAGE.pack(kind, len(payload)))
    if payload:
        main.sendall(payload)


def receive(main: socket.socket) -> tuple[Kind, bytes]:
    """The next message; EOF, an unknown kind or an oversize length raise."""
    kind, length = _MESSAGE.unpack(_recv_exactly(main, _MESSAGE.size))
    if kind not in Kind.__members__.values():
        raise BaselineError(f"main channel: unknown message kind {kind}")
    if length > MAX_MESSAGE_BYTES:
        raise BaselineError(f"main channel: {Kind(kind).name} of {length} B")
    return Kind(kind), _recv_exactly(main, length)


def expect(main: socket.socket, kind: Kind) -> bytes:
    """The payload of the next message, which must be ``kind`` (ERROR is the peer's)."""
    got, payload = receive(main)
    if got is Kind.ERROR:
        raise BaselineError(f"destination: {payload.decode(errors='replace')}")
    if got is not kind:
        raise BaselineError(f"main channel: {got.name} where {kind.name} belongs")
    return payload


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    buf = bytearray(count)
    view, got = memoryview(buf), 0
    while got < count:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise BaselineError(f"main channel closed by the peer ({got} of {count} B read)")
        got += n
    return bytes(buf)


def record_digests(records: Sequence[RecordDevice]) -> list[bytes]:
    """Runs in: the main thread. Digests of the vCPUs (an async API, no I/O behind it)."""
    async def all_of() -> list[bytes]:
        return [await r.digest() for r in records]
    return asyncio.run(all_of())


# ---------------------------------------------------------------- source

def migrate(spec: MachineConfig) -> BaselineReport:
    """Migrate ``spec``'s machine to a fresh destination process; every device verified.

    Runs in: the calling thread (the source's main thread). Raises :class:`BaselineError`
    naming the failed step; every thread, socket, device model and the destination are
    gone when it returns or raises.
    """
    table = device_table(spec)
    if any(d.backend not in (Backend.SIM_VCPU, Backend.VFIO_SIM) for d in table):
        raise BaselineError("the baseline migrates sim-vcpu and vfio-sim devices only")
    host = DeviceHost()  # sim devices share nothing, but every owner has one
    records = [make_device(d, spec.seed, incoming=False, host=host) for d in table
               if d.backend is Backend.SIM_VCPU]
    streams = [d for d in table if d.backend is Backend.VFIO_SIM]
    with contextlib.ExitStack() as stack:
        main, their_main = socket.socketpair()
        links = [socket.socketpair() for _ in streams]
        for sock in (main, their_main, *(s for pair in links for s in pair)):
            stack.callback(sock.close)  # on every path; closing twice is a no-op
        for ours, theirs in links:
            fdio.tune_for_bulk(ours)
            fdio.tune_for_bulk(theirs)
        proc = stack.enter_context(destination(spec, their_main, [t for _, t in links]))
        stack.callback(main.close)  # before the wait for the destination: EOF ends it
        threads = [stack.enter_context(DeviceThread(make_device(d, spec.seed, incoming=False,
                                                                host=host),
                                                    ours))
                   for d, (ours, _) in zip(streams, links, strict=True)]
        ids = [t.device.id for t in threads]
        wait_all("open", [t.submit(t.device.open) for t in threads], ids, READY_TIMEOUT_S)
        try:
            main.settimeout(READY_TIMEOUT_S)
            expect(main, Kind.READY)
            main.settimeout(STEP_TIMEOUT_S)
            report = _stop_and_copy(main, threads, records)
            _verify(main, threads, records)
            report = _checked(report, expect(main, Kind.REPORT))
        except OSError as exc:
            raise _broken(main, exc) from exc
    if proc.returncode != 0:
        raise BaselineError(f"destination exited with code {proc.returncode}")
    return report


def _stop_and_copy(main: socket.socket, threads: Sequence[DeviceThread],
                   records: Sequence[RecordDevice]) -> BaselineReport:
    """From the stop (t0) to RESUMED: the downtime."""
    record = memoryview(bytearray(max((r.spec.size for r in records), default=0)))
    with no_gc_pauses():
        t0 = time.monotonic_ns()
        saving = [t.submit(save_stream, t.device, t.channel) for t in threads]
        record_bytes = 0
        for device in records:
            n = device.get(record)
            send(main, Kind.VCPU, record[:n])
            record_bytes += n
        send(main, Kind.VCPUS_END)
        saved = wait_all("save", saving, [t.device.id for t in threads])
        t_saved = time.monotonic_ns()
        expect(main, Kind.LOADED)
        t_loaded = time.monotonic_ns()
        send(main, Kind.COMMIT)
        expect(main, Kind.RESUMED)
        t1 = time.monotonic_ns()
    return BaselineReport(
        downtime_ms=(t1 - t0) / 1e6, loaded_ms=(t_loaded - t0) / 1e6,
        saved_ms=(t_saved - t0) / 1e6, devices=len(threads) + len(records),
        bytes=sum(saved) + record_bytes, checked=0, mismatched=())


def _verify(main: socket.socket, threads: Sequence[DeviceThread],
            records: Sequence[RecordDevice]) -> None:
    """Off the critical path: send every device's digest for the destination to compare."""
    streams = wait_all("digest", [t.submit(t.device.digest) for t in threads],
                       [t.device.id for t in threads])
    digests = {t.device.id: d.hex() for t, d in zip(threads, streams, strict=True)}
    digests |= {r.id: d.hex() for r, d in zip(records, record_digests(records), strict=True)}
    send(main, Kind.DIGESTS, json.dumps(digests).encode())


def _broken(main: socket.socket, exc: OSError) -> BaselineError:
    """The destination's ERROR if it sent one before the main channel broke (it stops
    reading when it fails, so the source sees a broken pipe first), else the break."""
    with contextlib.suppress(OSError, BaselineError):
        main.settimeout(CLOSE_TIMEOUT_S)
        while True:
            kind, payload = receive(main)
            if kind is Kind.ERROR:
                return BaselineError(f"destination: {payload.decode(errors='replace')}")
    return BaselineError(f"main channel to the destination broke: {describe(exc)}")


def _checked(report: BaselineReport, payload: bytes) -> BaselineReport:
    try:
        body = json.loads(payload)
        checked, mismatched = int(body["checked"]), tuple(map(str, body["mismatched"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise BaselineError(f"REPORT: malformed body: {exc}") from exc
    return dataclasses.replace(report, checked=checked, mismatched=mismatched)


@contextlib.contextmanager
def destination(spec: MachineConfig, main: socket.socket,
                channels: Sequence[socket.socket]) -> Iterator[subprocess.Popen[bytes]]:
    """Start the destination with ``main`` and ``channels`` (closed here once it has them);
    on exit wait for it, and terminate or kill it if it does not end by itself."""
    fds = [main.fileno(), *(c.fileno() for c in channels)]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benches.per_device_threads",
             "--spec", json.dumps(spec.to_dict()), "--fds", ",".join(map(str, fds))],
            pass_fds=fds, stdin=subprocess.DEVNULL, cwd=_REPO)
    except OSError as exc:
        raise BaselineError(f"cannot start the destination: {exc}") from exc
    finally:
        for sock in (main, *channels):
            sock.close()
    try:
        yield proc
    finally:
        _reap(proc)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- destination

def serve(spec: MachineConfig, main: socket.socket, channels: Sequence[socket.socket]) -> None:
    """Runs in: the destination process's main thread. Receive, load, resume, compare."""
    table = device_table(spec)
    host = DeviceHost()
    records = [make_device(d, spec.seed, incoming=True, host=host) for d in table
               if d.backend is Backend.SIM_VCPU]
    streams = [d for d in table if d.backend is Backend.VFIO_SIM]
    if len(streams) != len(channels):
        raise BaselineError(f"{len(channels)} device channels for {len(streams)} devices")
    with contextlib.ExitStack() as stack:
        threads = [stack.enter_context(DeviceThread(make_device(d, spec.seed, incoming=True,
                                                                host=host),
                                                    channel))
                   for d, channel in zip(streams, channels, strict=True)]
        ids = [t.device.id for t in threads]
        wait_all("prepare", [t.submit(prepare_load, t.device) for t in threads], ids,
                 READY_TIMEOUT_S)
        loading = [t.submit(load_stream, t.device, t.channel) for t in threads]
        send(main, Kind.READY)
        with no_gc_pauses():
            _put_records(main, records)
            wait_all("load", loading, ids)
            send(main, Kind.LOADED)
            expect(main, Kind.COMMIT)
            wait_all("resume", [t.submit(t.device.resume) for t in threads], ids)
            send(main, Kind.RESUMED)  # sim vCPUs have nothing to resume
        theirs = json.loads(expect(main, Kind.DIGESTS))
        streams_digests = wait_all("digest", [t.submit(t.device.digest) for t in threads], ids)
        ours = dict(zip(ids, streams_digests, strict=True))
        ours |= dict(zip([r.id for r in records], record_digests(records), strict=True))
        mismatched = sorted(i for i in ours.keys() | theirs.keys()
                            if i not in ours or theirs.get(i) != ours[i].hex())
        send(main, Kind.REPORT, json.dumps({"checked": len(ours.keys() & theirs.keys()),
                                            "mismatched": mismatched}).encode())


def _put_records(main: socket.socket, records: Sequence[RecordDevice]) -> None:
    """Put each vCPU record as it arrives, in table order, until VCPUS_END."""
    count = 0
    while True:
        kind, payload = receive(main)
        if kind is Kind.VCPUS_END:
            break
        if kind is not Kind.VCPU or count == len(records):
            raise BaselineError(f"main channel: {kind.name} after {count} vCPU records "
                                f"(the machine has {len(records)})")
        records[count].put(memoryview(payload))
        count += 1
    if count != len(records):
        raise BaselineError(f"main channel: {count} vCPU records for {len(records)} vCPUs")


def destination_main(argv: Sequence[str] | None = None) -> int:
    """The destination's entry point: ``--spec JSON --fds MAIN,DEV0,DEV1,...``."""
    parser = argparse.ArgumentParser(prog="python -m benches.per_device_threads")
    parser.add_argument("--spec", required=True, help="the machine spec as JSON")
    parser.add_argument("--fds", required=True, help="main channel fd, then one per device")
    args = parser.parse_args(argv)
    fds = [int(fd) for fd in args.fds.split(",")]
    main_channel = socket.socket(fileno=fds[0])
    channels = [socket.socket(fileno=fd) for fd in fds[1:]]
    main_channel.settimeout(STEP_TIMEOUT_S)
    with main_channel:
        try:
            serve(parse_spec(json.loads(args.spec)), main_channel, channels)
        except Exception as exc:
            text = f"{type(exc).__name__}: {describe(exc)}"
            print(f"per_device_threads destination: {text}", file=sys.stderr)
            with contextlib.suppress(OSError):
                send(main_channel, Kind.ERROR, text.encode())
            return 1
        finally:
            for channel in channels:
                channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(destination_main())
