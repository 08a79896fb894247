"""A pool worker process: owns devices, its data channels and a partition of the arena.

Runs in: a worker process started by :class:`devstate.worker.pool.WorkerPool` (forkserver, never
fork from the threaded coordinator). Life of a worker::

    attach arena, pre-fault its partition, pin to its CPU -> "ready" reply (req 0)
    serve requests on its own uvloop: each runs as a task, replies when done
      OpenDevices -> devices built and opened here (the owner rule: only this process
                     ever touches them; a vfio-sim model process is a child of this one)
      JoinMesh       -> its link to another worker of the side (handoffs through the arena)
      ConnectChannels / AdoptChannel -> its data channels (none, one or several)
      PrepareLoad, then Save / Load -> save.Saver / load.Loader over its channels, which
                     close after; the reply is a count, the per-device rows wait for Results
      Pause / Resume / Discard / Digests / Cancel / SnapshotRecords / RestoreRecords
    Shutdown, or EOF on its pipe (the coordinator died) -> close devices, exit

Errors in a request are replied with the exception's type, text and traceback; the worker
itself keeps serving. SIGINT is ignored: Ctrl-C belongs to the coordinator, which shuts the pool
down in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any

import psutil
import uvloop

from devstate.arena.slots import Arena, Layout, Slot
from devstate.config.spec import DeviceTable
from devstate.devices import Device, RecordDevice, StreamDevice, make_device
from devstate.errors import ChannelError, DeviceError
from devstate.lifecycle import no_gc_pauses
from devstate.net import channels, fdio
from devstate.worker import jobs as m
from devstate.worker.faults import injector
from devstate.worker.handoff import Mesh
from devstate.worker.layout import CHUNK_CLASS, RECORD_CLASS, WINDOW_CLASS
from devstate.worker.load import Loader
from devstate.worker.save import Saver


def worker_main(index: int, conn: Connection, arena_name: str, arena_size: int,
                layout: Layout, cpu: int | None, table: DeviceTable) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if cpu is not None:
            psutil.Process().cpu_affinity([cpu])
        arena = Arena.attach(arena_name, arena_size)
    except BaseException as exc:  # report why start-up failed before exiting
        conn.send(m.Reply(0, False, error_type=type(exc).__name__, error=str(exc)))
        raise SystemExit(1) from exc
    worker: Worker | None = None
    try:
        worker = Worker(index, conn, arena, layout, table)
        # Everything alive now lives as long as the worker: keep it out of the cyclic GC's
        # walks, which otherwise cost as much CPU as the socket copies during a transfer.
        gc.freeze()
        conn.send(m.Reply(0, True, value=os.getpid()))
        uvloop.run(worker.serve())
    except (BrokenPipeError, EOFError):
        raise SystemExit(1) from None  # the coordinator went away first: nothing to report
    finally:
        # A cancelled Save or Load can leave reference cycles (tasks, frames) that hold
        # views of the arena's slots: collect them, so the arena unmaps without a
        # foreign view.
        worker = None
        gc.unfreeze()
        gc.collect()
        arena.close()


class Worker:
    """The state of one worker process and its request loop."""

    def __init__(self, index: int, conn: Connection, arena: Arena, layout: Layout,
                 table: DeviceTable) -> None:
        self.index = index
        self._conn = conn
        self._table = table
        self._slots = arena.slot_pool(layout, index)
        if layout.workers > 1:
            # Handoffs read and write the slots of the other workers' partitions too.
            arena.prefault(0, layout.total_bytes)
        self._arena = arena.view(0, layout.total_bytes)
        self._mesh: Mesh | None = None
        self._devices: dict[int, Device] = {}
        self._channels: dict[int, socket.socket] = {}
        self._saver: Saver | None = None  # the Save in progress (precopy asks it)
        self._saved = (0, 0)  # the last Save's progress, once it ended
        self._switchover: asyncio.Event | None = None
        self._busy: asyncio.Task[Any] | None = None
        self._results: list[m.ResultRow] = []  # of the last Save or Load
        self._snapshot: list[tuple[Slot, int]] = []  # of the last SnapshotRecords
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()

    async def serve(self) -> None:
        """Serve requests until Shutdown or the coordinator's end of the pipe closes."""
        loop = asyncio.get_running_loop()
        fdio.watch_blocking(self._conn.fileno(), self._on_request)
        try:
            await self._stop.wait()
        finally:
            loop.remove_reader(self._conn.fileno())
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._close_devices()
            self._drop_channels()
            if self._mesh is not None:
                self._mesh.close()
            if self._executor is not None:
                self._executor.shutdown()

    def _on_request(self) -> None:
        try:
            while self._conn.poll():
                request = self._conn.recv()
                self._start(request)
        except (EOFError, OSError):
            self._stop.set()  # the coordinator is gone: nobody to serve

    def _start(self, request: m.Request) -> None:
        command = request.command
        if isinstance(command, m.Cancel):
            if self._busy is not None:
                self._busy.cancel()
            self._reply(m.Reply(request.req, True))
            return
        fd = None
        if isinstance(command, m.AdoptChannel | m.JoinMesh):
            # The fd follows the message on the same pipe: take it before anything else.
            fd = recv_handle(self._conn)
        task = asyncio.get_running_loop().create_task(self._run(request, fd))
        if isinstance(command, m.Save | m.Load):
            self._busy = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request: m.Request, fd: int | None) -> None:
        critical = isinstance(request.command, m.Save | m.Load | m.SnapshotRecords
                              | m.RestoreRecords)
        with no_gc_pauses() if critical else contextlib.nullcontext():
            reply = await self._reply_for(request, fd)
        self._reply(reply)

    async def _reply_for(self, request: m.Request, fd: int | None) -> m.Reply:
        try:
            value = await self._handle(request.command, fd)
            reply = m.Reply(request.req, True, value=value)
        except asyncio.CancelledError:
            reply = m.Reply(request.req, False, error_type="Cancelled",
                            error=f"{type(request.command).__name__} was cancelled")
        except Exception as exc:
            cause = _first_error(exc)
            reply = m.Reply(request.req, False, error_type=type(cause).__name__,
                            error=str(cause) or repr(cause),
                            traceback=traceback.format_exc(limit=8))
        return reply

    def _reply(self, reply: m.Reply) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(reply)

    async def _handle(self, command: Any, fd: int | None = None) -> Any:
        match command:
            case m.OpenDevices(devices=devices, incoming=incoming):
                await self._open_devices(devices, incoming)
            case m.JoinMesh(peer=peer):
                assert fd is not None
                if self._mesh is None:
                    self._mesh = Mesh(self.index)
                self._mesh.join(peer, fd)
            case m.ArmFault(fault=fault):
                injector.arm(fault)
            case m.ConnectChannels(address=address, hellos=hellos, tls=tls):
                self._drop_channels()
                for index, hello in hellos:
                    try:
                        self._channels[index] = await channels.open_channel(
                            address, hello, tls)
                    except ChannelError as exc:
                        raise ChannelError(f"data channel {index}: {exc}") from exc
                injector.strike("setup", channels=self._channels.values())
            case m.AdoptChannel(index=index, hello=hello, tls=tls):
                assert fd is not None
                self._channels[index] = await channels.adopt_channel(fd, hello, tls)
                injector.strike("setup", channels=self._channels.values())
            case m.Save(order=order, concurrent=concurrent, routes=routes, gen=gen,
                        record_threads=threads, bandwidth_limit=limit, precopy=precopy,
                        transfer=transfer):
                saver = Saver(self.index, self._devices, self._slots, self._arena,
                              self._channels, self._mesh, routes, gen,
                              record_class=RECORD_CLASS, chunk_class=CHUNK_CLASS,
                              executor=self._record_executor(threads), bandwidth_limit=limit,
                              transfer=transfer if concurrent else None)
                self._saver = saver
                self._switchover = asyncio.Event() if precopy else None
                try:
                    self._results = await saver.run(order, concurrent, self._switchover)
                finally:
                    self._saved = saver.devices_done, saver.bytes_read
                    self._saver = self._switchover = None
                    self._drop_channels()
                    self._reclaim_slots()
                return len(self._results)
            case m.SwitchOver():
                if self._switchover is None:
                    raise RuntimeError(f"worker {self.index}: no precopy to switch over from")
                self._switchover.set()
            case m.PrecopyRemaining():
                return await self._saver.precopy_remaining() if self._saver else {}
            case m.Progress():
                current = self._saver
                return (current.devices_done, current.bytes_read) if current else self._saved
            case m.PrepareLoad(devices=devices):
                await asyncio.gather(*(d.load_begin() for i, d in self._devices.items()
                                       if i in devices and isinstance(d, StreamDevice)))
            case m.Load(devices=devices, concurrent=concurrent, owner=owner, gen=gen,
                        record_threads=threads):
                windows = self._windows()
                loader = Loader(self.index, self._devices, self._slots, self._arena, windows,
                                self._channels, self._mesh, owner, gen,
                                record_class=RECORD_CLASS, chunk_class=CHUNK_CLASS,
                                executor=self._record_executor(threads),
                                after=self._table.dependencies())
                try:
                    self._results = await loader.run(devices, concurrent)
                finally:
                    for window in windows.values():
                        self._slots.release(window)
                    self._drop_channels()
                    self._reclaim_slots()
                return len(self._results)
            case m.Results():
                return self._results
            case m.SnapshotRecords(count=count):
                return self._snapshot_records(count)
            case m.RestoreRecords():
                return self._restore_records()
            case m.Resume():
                self._drop_channels()  # a source recovering: channels of a failed setup
                injector.strike("resume")
                await self._each_device("resume")
            case m.Pause():
                await self._each_device("stop")
            case m.Discard():
                self._drop_channels()
                await asyncio.gather(*(d.reset() for d in self._devices.values()
                                       if isinstance(d, StreamDevice)))
            case m.Digests(devices=devices):
                digests = await asyncio.gather(*(self._devices[i].digest() for i in devices))
                return {i: d.hex() for i, d in zip(devices, digests, strict=True)}
            case m.Shutdown():
                self._stop.set()
            case _:
                raise TypeError(f"unknown command {command!r}")
        return None

    def _record_executor(self, threads: int) -> ThreadPoolExecutor | None:
        """The single-vm get/put threads (made once, before they are needed), or None."""
        if threads <= 1:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(threads, thread_name_prefix="vcpu")
        return self._executor

    def _snapshot_records(self, limit: int | None) -> tuple[int, int]:
        self._release_snapshot()
        records = [d for d in self._devices.values() if isinstance(d, RecordDevice)][:limit]
        for _ in records:
            slot = self._slots.acquire_nowait(RECORD_CLASS)
            if slot is None:
                self._release_snapshot()
                raise RuntimeError(f"worker {self.index}: {len(records)} records need as many "
                                   "record slots (raise MigrationParams.record_slots)")
            self._snapshot.append((slot, 0))
        start = time.perf_counter_ns()
        for n, device in enumerate(records):
            slot = self._snapshot[n][0]
            self._snapshot[n] = (slot, device.get(slot.view))
        return time.perf_counter_ns() - start, len(records)

    def _restore_records(self) -> int:
        records = [d for d in self._devices.values()
                   if isinstance(d, RecordDevice)][:len(self._snapshot)]
        start = time.perf_counter_ns()
        for device, (slot, length) in zip(records, self._snapshot, strict=True):
            device.put(slot.view[:length])
        elapsed = time.perf_counter_ns() - start
        self._release_snapshot()
        return elapsed

    def _release_snapshot(self) -> None:
        for slot, _ in self._snapshot:
            self._slots.release(slot)
        self._snapshot.clear()

    async def _each_device(self, step: str) -> None:
        """Call ``step`` (``stop`` or ``resume``) on every owned device. Streams go
        concurrently (each is a round trip to its model); records one after another: a
        task per vCPU would cost more than its step."""
        streams = [d for d in self._devices.values() if isinstance(d, StreamDevice)]
        for device in self._devices.values():
            if not isinstance(device, StreamDevice):
                await getattr(device, step)()
        await asyncio.gather(*(getattr(d, step)() for d in streams))

    async def _open_devices(self, devices: tuple[int, ...], incoming: bool) -> None:
        for i in devices:
            if i not in self._devices:
                self._devices[i] = make_device(self._table[i], self._table.machine.seed,
                                               incoming=incoming)
        await asyncio.gather(*(self._devices[i].open() for i in devices))

    async def _close_devices(self) -> None:
        results = await asyncio.gather(*(d.close() for d in self._devices.values()),
                                       return_exceptions=True)
        self._devices.clear()
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, DeviceError):
                raise result

    def _windows(self) -> dict[int, Slot]:
        """A receive window slot for each data channel of this worker."""
        windows: dict[int, Slot] = {}
        for index in self._channels:
            window = self._slots.acquire_nowait(WINDOW_CLASS)
            if window is None:
                for taken in windows.values():
                    self._slots.release(taken)
                raise RuntimeError(f"worker {self.index}: {len(self._channels)} channels, "
                                   f"{self._slots.counts[WINDOW_CLASS]} receive windows")
            windows[index] = window
        return windows

    def _reclaim_slots(self) -> None:
        """After a Save or Load, every record and chunk slot is free again.

        A failed or cancelled run can end with slots held by tasks it cancelled; the pool
        lives as long as the worker (a source recovers and migrates again), so nothing of
        one run may shrink it for the next.
        """
        if not self._snapshot:  # a probe's snapshot holds record slots across runs
            self._slots.reclaim(RECORD_CLASS)
        self._slots.reclaim(CHUNK_CLASS)

    def _drop_channels(self) -> None:
        """Close this worker's data channels: each serves one migration."""
        for sock in self._channels.values():
            sock.close()
        self._channels.clear()


def _first_error(exc: BaseException) -> BaseException:
    """The first real error inside a TaskGroup's ExceptionGroup: the one that ended the rest."""
    while isinstance(exc, BaseExceptionGroup):
        errors = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (errors or list(exc.exceptions))[0]
    return exc
