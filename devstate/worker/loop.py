"""A pool worker process: owns devices, its data channels and a partition of the arena.

Runs in: a worker process started by :class:`devstate.worker.pool.WorkerPool` (forkserver, never
fork from the threaded coordinator). Life of a worker::

    attach arena, pre-fault its partition, pin to its CPU -> "ready" reply (req 0)
    serve requests on its own uvloop: each runs as a task, replies when done
      OpenDevices -> devices built and opened here (the owner rule: only this process
                     ever touches them; a vfio-sim model process is a child of this one)
      JoinMesh       -> its link to another worker of the side (handoffs through the arena)
      ConnectChannels / AdoptChannel -> its data channels (none, one or several)
      Save (set up, then Armed replies) ... SwitchOver (the stop) -> save.Saver, and
      PrepareLoad, then Load -> load.Loader, over its channels, which
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
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any, TypeVar

import psutil
import uvloop

from devstate.arena.slots import Arena, Layout, Slot
from devstate.config.params import Schedule
from devstate.config.spec import DeviceTable
from devstate.devices import Device, DeviceHost, StreamDevice, make_device
from devstate.errors import ChannelError, DeviceError
from devstate.lifecycle import no_gc_pauses
from devstate.net import channels, fdio
from devstate.report.vcpus import VcpuCost
from devstate.worker import jobs as m
from devstate.worker.faults import injector
from devstate.worker.handoff import Mesh
from devstate.worker.holdings import Holdings
from devstate.worker.layout import CHUNK_CLASS, RECORD_CLASS, WINDOW_CLASS
from devstate.worker.load import Loader
from devstate.worker.probe import RecordProbe
from devstate.worker.save import Saver
from devstate.worker.threads import OwnerThreads
from devstate.worker.throttle import GuestThrottle
from devstate.worker.wakeup import prefer_wakeups


def worker_main(index: int, conn: Connection, arena_name: str, arena_size: int,
                layout: Layout, cpu: int | None, table: DeviceTable) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if cpu is not None:
            psutil.Process().cpu_affinity([cpu])
        prefer_wakeups()
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


J = TypeVar("J", bound=m.Job)
Handler = Callable[["Worker", J, "int | None"], Awaitable[object]]
# Each job's handler (a Worker method); ``fd`` is the descriptor that followed the job, if any.
_HANDLERS: dict[type[m.Job], Handler[Any]] = {}


def handles(kind: type[J]) -> Callable[[Handler[J]], Handler[J]]:
    """Register the decorated Worker method as the handler of jobs of type ``kind``."""
    def register(handler: Handler[J]) -> Handler[J]:
        _HANDLERS[kind] = handler
        return handler
    return register


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
        self._host = DeviceHost()  # what this process's devices share (its KVM VM)
        self._throttle = GuestThrottle(self._host)  # auto-converge, on the VM's owner
        self._probe_paused = False  # a record probe paused the guest (SnapshotRecords)
        self._channels: dict[int, socket.socket] = {}
        self._saver: Saver | None = None  # the Save in progress (precopy asks it)
        self._saved = (0, 0)  # the last Save's progress, once it ended
        self._switchover: asyncio.Event | None = None
        # Per Save (by gen): whether it armed (True) or ended first (False); the latest only.
        self._arming: dict[int, asyncio.Future[bool]] = {}
        self._busy: asyncio.Task[Any] | None = None
        self._results: list[m.ResultRow] = []  # of the last Save or Load
        self._probe = RecordProbe(index, self._slots, RECORD_CLASS)  # SnapshotRecords' records
        self._threads: OwnerThreads | None = None  # the VM owner's, made on first use
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
            if self._threads is not None:
                self._threads.shutdown()

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
        if isinstance(command, m.AdoptChannel | m.JoinMesh | m.MapRam):
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

    async def _handle(self, job: m.Job, fd: int | None = None) -> object:
        handler = _HANDLERS.get(type(job))
        if handler is None:
            raise TypeError(f"unknown job {job!r}")
        return await handler(self, job, fd)

    # -- one handler per job (registered in _HANDLERS by @handles) ---------------------

    @handles(m.OpenDevices)
    async def _open_devices(self, job: m.OpenDevices, _: int | None) -> None:
        for i in job.devices:
            if i not in self._devices:
                self._devices[i] = make_device(self._table[i], self._table.machine.seed,
                                               incoming=job.incoming, host=self._host)
        await asyncio.gather(*(self._devices[i].open() for i in job.devices))

    @handles(m.JoinMesh)
    async def _join_mesh(self, job: m.JoinMesh, fd: int | None) -> None:
        assert fd is not None
        if self._mesh is None:
            self._mesh = Mesh(self.index)
        self._mesh.join(job.peer, fd)

    @handles(m.MapRam)
    async def _map_ram(self, job: m.MapRam, fd: int | None) -> None:
        assert fd is not None
        try:
            self._host.attach_ram(fd, job.size)
        finally:
            os.close(fd)

    @handles(m.StartGuest)
    async def _start_guest(self, job: m.StartGuest, _: int | None) -> None:
        self._host.start_guest(paused=job.paused)

    @handles(m.StopGuest)
    async def _stop_guest(self, job: m.StopGuest, _: int | None) -> int:
        await self._throttle.stop()  # the guest runs again: its stop is the real one
        stopped = self._host.stop_guest()
        if job.switch_over and stopped:
            self._switch_over_now()
        return stopped

    @handles(m.LogDirty)
    async def _log_dirty(self, job: m.LogDirty, _: int | None) -> None:
        if not job.on:
            await self._throttle.stop()  # the precopy is over: the guest runs free
        self._host.log_dirty(job.on)

    @handles(m.ThrottleGuest)
    async def _throttle_guest(self, job: m.ThrottleGuest, _: int | None) -> None:
        self._throttle.set(job.percent)

    @handles(m.SyncDirty)
    async def _sync_dirty(self, _job: m.SyncDirty, _: int | None
                          ) -> tuple[tuple[int, int], ...]:
        return self._host.sync_dirty()

    @handles(m.GuestCheck)
    async def _guest_check(self, _job: m.GuestCheck, _: int | None) -> str | None:
        return self._host.guest_problem()

    @handles(m.ArmFault)
    async def _arm_fault(self, job: m.ArmFault, _: int | None) -> None:
        injector.arm(job.fault)

    @handles(m.ConnectChannels)
    async def _connect_channels(self, job: m.ConnectChannels, _: int | None) -> None:
        self._drop_channels()
        for index, hello in job.hellos:
            try:
                self._channels[index] = await channels.open_channel(job.address, hello, job.tls)
            except ChannelError as exc:
                raise ChannelError(f"data channel {index}: {exc}") from exc
        injector.strike("setup", channels=self._channels.values())

    @handles(m.AdoptChannel)
    async def _adopt_channel(self, job: m.AdoptChannel, fd: int | None) -> None:
        assert fd is not None
        self._channels[job.index] = await channels.adopt_channel(fd, job.hello, job.tls)
        injector.strike("setup", channels=self._channels.values())

    @handles(m.Save)
    async def _save(self, job: m.Save, _: int | None) -> int:
        concurrent = job.schedule is Schedule.CONCURRENT
        self._host.vcpu_cost()  # VcpuCosts counts this run's work only
        saver = Saver(self._holdings(job), job.routes, job.gen,
                      bandwidth_limit=job.bandwidth_limit,
                      cap_stop_copy=job.cap_stop_copy,
                      transfer=job.transfer if concurrent else None)
        self._saver = saver
        self._switchover = asyncio.Event()
        arming = self._arming_of(job.gen)
        for gen in [g for g in self._arming if g < job.gen]:  # a newer Save: drop older
            self._settle(self._arming.pop(gen), False)
        try:
            self._results = await saver.run(job.order, concurrent, self._switchover,
                                            precopy=job.precopy,
                                            on_armed=lambda: self._settle(arming, True))
        finally:
            self._settle(arming, False)  # ended without arming: nobody waits in vain
            self._saved = saver.devices_done, saver.bytes_read
            self._saver = self._switchover = None
            self._drop_channels()
            self._reclaim_slots()
        return len(self._results)

    def _arming_of(self, gen: int) -> asyncio.Future[bool]:
        arming = self._arming.get(gen)
        if arming is None:
            arming = self._arming[gen] = asyncio.get_running_loop().create_future()
        return arming

    @staticmethod
    def _settle(arming: asyncio.Future[bool], armed: bool) -> None:
        if not arming.done():
            arming.set_result(armed)

    @handles(m.Armed)
    async def _armed(self, job: m.Armed, _: int | None) -> bool:
        # Its Save may not have begun yet (the two travel in separate requests).
        if any(gen > job.gen for gen in self._arming):
            return False  # a newer Save began: that one ended long ago
        return await asyncio.shield(self._arming_of(job.gen))

    @handles(m.SwitchOver)
    async def _switch_over(self, _job: m.SwitchOver, _: int | None) -> None:
        self._switch_over_now()

    def _switch_over_now(self) -> None:
        """The VM stopped: the armed Save moves on to its stop-and-copy."""
        if self._switchover is None:
            raise RuntimeError(f"worker {self.index}: no Save to switch over")
        if self._saver is not None:
            self._saver.stopped()
        self._switchover.set()

    @handles(m.PrecopyRemaining)
    async def _precopy_remaining(self, _job: m.PrecopyRemaining, _: int | None
                                 ) -> dict[int, int]:
        return await self._saver.precopy_remaining() if self._saver else {}

    @handles(m.Progress)
    async def _progress(self, _job: m.Progress, _: int | None) -> tuple[int, int]:
        current = self._saver
        return (current.devices_done, current.bytes_read) if current else self._saved

    @handles(m.PrepareLoad)
    async def _prepare_load(self, job: m.PrepareLoad, _: int | None) -> None:
        await asyncio.gather(*(d.load_begin() for i, d in self._devices.items()
                               if i in job.devices and isinstance(d, StreamDevice)))

    @handles(m.Load)
    async def _load(self, job: m.Load, _: int | None) -> int:
        windows = self._windows()
        self._host.vcpu_cost()  # VcpuCosts counts this run's work only
        loader = Loader(self._holdings(job), windows, job.owner, job.gen,
                        after=self._table.dependencies(), readback=job.vcpu_readback)
        try:
            self._results = await loader.run(job.devices,
                                             job.schedule is Schedule.CONCURRENT)
        finally:
            for window in windows.values():
                self._slots.release(window)
            self._drop_channels()
            self._reclaim_slots()
        return len(self._results)

    @handles(m.Results)
    async def _results_of_last(self, _job: m.Results, _: int | None) -> list[m.ResultRow]:
        return self._results

    @handles(m.SnapshotRecords)
    async def _snapshot_records(self, job: m.SnapshotRecords, _: int | None
                                ) -> tuple[int, int]:
        # A running guest's vCPUs are busy in KVM_RUN, and a snapshot put back after they
        # ran on would send them back in time: the guest pauses from here to the restore
        # (a sample of gets and puts, a few ms, once per migration, before its stop).
        self._probe_paused = self._host.stop_guest() != 0
        return self._probe.snapshot(self._devices.values(), job.count)

    @handles(m.RestoreRecords)
    async def _restore_records(self, _job: m.RestoreRecords, _: int | None) -> int:
        try:
            return self._probe.restore(self._devices.values())
        finally:
            if self._probe_paused:
                self._probe_paused = False
                self._host.resume_guest()

    @handles(m.ArmGuest)
    async def _arm_guest(self, _job: m.ArmGuest, _: int | None) -> None:
        self._host.arm_guest()

    @handles(m.Resume)
    async def _resume(self, _job: m.Resume, _: int | None) -> int:
        self._drop_channels()  # a source recovering: channels of a failed setup
        injector.strike("resume")
        await self._each_device("resume")
        await self._throttle.stop()
        # When this worker's part of the VM runs again: a live guest's last vCPU released
        # into KVM_RUN, else the end of its devices' resume; 0 from a worker that holds no
        # part (woken while hundreds of vCPUs take the cores, it answered up to 14 ms after
        # the release, which then ended the downtime).
        return self._host.resume_guest() or (time.monotonic_ns() if self._devices else 0)

    @handles(m.PrepareVcpus)
    async def _prepare_vcpus(self, job: m.PrepareVcpus, _: int | None) -> None:
        threads = self._owner_threads(job.cpus, job.threads)
        if threads is not None:
            await asyncio.wrap_future(threads.started)

    @handles(m.VcpuCosts)
    async def _vcpu_costs(self, _job: m.VcpuCosts, _: int | None) -> VcpuCost | None:
        return self._host.vcpu_cost()

    @handles(m.Pause)
    async def _pause(self, _job: m.Pause, _: int | None) -> None:
        self._host.stop_guest()
        await self._each_device("stop")

    @handles(m.Discard)
    async def _discard(self, _job: m.Discard, _: int | None) -> None:
        self._host.stop_guest()  # an armed guest's threads back to parked
        self._drop_channels()
        await asyncio.gather(*(d.reset() for d in self._devices.values()
                               if isinstance(d, StreamDevice)))

    @handles(m.Digests)
    async def _digests(self, job: m.Digests, _: int | None) -> dict[int, str]:
        digests = await asyncio.gather(*(self._devices[i].digest() for i in job.devices))
        return {i: d.hex() for i, d in zip(job.devices, digests, strict=True)}

    @handles(m.Shutdown)
    async def _shutdown(self, _job: m.Shutdown, _: int | None) -> None:
        self._stop.set()

    # -- what the handlers share -------------------------------------------------------

    def _holdings(self, job: m.Save | m.Load) -> Holdings:
        """What this worker lends a Save or Load: with its batched records (a KVM VM's
        vCPUs), the owner's threads that get or put them."""
        threads = self._owner_threads(job.vcpu_cpus, job.vcpu_threads)
        if threads is None:
            return Holdings(self.index, self._devices, self._slots, self._arena,
                            self._channels, self._mesh)
        return Holdings(self.index, self._devices, self._slots, self._arena, self._channels,
                        self._mesh, self._host.batch, threads.executor, threads.count)

    def _owner_threads(self, cpus: tuple[int, ...], wanted: int | None) -> OwnerThreads | None:
        """The threads this worker's batched records run on (started now if they are not
        the ones asked for), or None if it has none (no KVM VM)."""
        batch = self._host.batch
        if batch is None:
            return None
        count = batch.threads(len(cpus), wanted)
        if self._threads is None or not self._threads.fits(cpus, count):
            if self._threads is not None:
                self._threads.shutdown()
            self._threads = OwnerThreads(cpus, count)
        return self._threads

    async def _each_device(self, step: str) -> None:
        """Call ``step`` (``stop`` or ``resume``) on every owned device. Streams go
        concurrently (each is a round trip to its model); records one after another: a
        task per vCPU would cost more than its step. A device whose step is the base
        class's no-op is skipped: a resume after COMMIT is downtime, and 1024 awaits of
        nothing are a measurable part of it (as is asking each of them: the question
        goes to their few classes)."""
        kinds = {type(d) for d in self._devices.values()}
        streams = {k for k in kinds if issubclass(k, StreamDevice)}
        stepped = {k for k in kinds - streams if getattr(k, step) is not getattr(Device, step)}
        for device in [d for d in self._devices.values() if type(d) in stepped]:
            await getattr(device, step)()
        await asyncio.gather(*(getattr(d, step)() for d in self._devices.values()
                               if type(d) in streams))

    async def _close_devices(self) -> None:
        results = await asyncio.gather(*(d.close() for d in self._devices.values()),
                                       return_exceptions=True)
        self._devices.clear()
        self._host.close()
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
        if not self._probe.holding:  # a probe's snapshot holds record slots across runs
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
