"""The worker pool, as the coordinator sees it: start, dispatch, health, shutdown.

Runs in: the coordinator process, on its event loop.

::

    coordinator loop                       worker i (process, own uvloop)
    ----------------                       ------------------------------
    call(i, cmd) --Request(req, cmd)-----> handle as a task
         future <----Reply(req, ...)------  reply when done
    sentinel of worker i readable  ------> every pending future of i fails with WorkerLost

Workers start from a forkserver (the coordinator may have threads; fork would copy a
running event loop and locks), preloaded with the heavy imports, are pinned to CPUs, and
attach the arena before the pool counts as started: all of it before the VM stops.
A worker's death is seen through its process sentinel, a pipe the kernel closes when the
process exits, so :class:`WorkerLost` reaches every waiting call at once, never a hang.
Closing is idempotent and safe on a pool that never fully started: ask politely, wait a
bounded time, then terminate and kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import time
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import send_handle
from typing import Any

from devstate.arena.slots import Arena, Layout, sweep_stale_segments
from devstate.config.spec import DeviceTable
from devstate.errors import DevstateError, WorkerFailed, WorkerLost
from devstate.lifecycle import AsyncLifecycle, background
from devstate.net import fdio
from devstate.worker import jobs as m

# Bounds, in seconds: a worker attaches and pre-faults its partition in well under a second;
# a polite shutdown closes devices (device-model processes) in tens of milliseconds.
START_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 5.0
# A worker acknowledges Cancel as soon as it reads it (its loop cancels the running job):
# one that has not within this bound is frozen (SIGSTOP) or wedged, and is killed.
CANCEL_TIMEOUT_S = 5.0
_PRELOAD = ["devstate.worker.loop"]


class _RemoteTraceback(Exception):
    """The worker's traceback, shown as the cause of a WorkerFailed (as CPython's pools do)."""

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.args[0] if self.args else ''}\"\"\""


def usable_cpus() -> list[int]:
    """CPUs this process may run on (affinity, which respects cpusets)."""
    return sorted(os.sched_getaffinity(0))


class WorkerPool(AsyncLifecycle):
    """A fixed set of worker processes sharing one arena."""

    def __init__(self, table: DeviceTable, layout: Layout, *, name: str = "pool",
                 cpus: list[int] | None = None) -> None:
        self.table = table
        self.layout = layout
        self.name = name
        self._cpus = cpus if cpus is not None else usable_cpus()
        self.arena: Arena | None = None
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._pending: list[dict[int, asyncio.Future[Any]]] = []
        self._lost: dict[int, WorkerLost] = {}
        self._exited: list[asyncio.Event] = []
        self._next_req = 1
        self._closed = False

    @property
    def size(self) -> int:
        """Number of workers."""
        return self.layout.workers

    @property
    def pids(self) -> list[int]:
        """Worker process ids, in worker order."""
        return [p.pid for p in self._procs if p.pid is not None]

    async def start(self) -> None:
        """Create the arena and start every worker; return when all are attached."""
        sweep_stale_segments()  # left by a coordinator killed during an earlier pool start
        self.arena = Arena.create(self.layout.total_bytes)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        from devstate.worker.loop import worker_main

        loop = asyncio.get_running_loop()
        try:
            for i in range(self.size):
                parent, child = ctx.Pipe(duplex=True)
                cpu = self._cpus[i % len(self._cpus)] if self._cpus else None
                proc = ctx.Process(target=worker_main, name=f"devstate-{self.name}-{i}",
                                   args=(i, child, self.arena.name, self.arena.size,
                                         self.layout, cpu, self.table), daemon=True)
                self._procs.append(proc)
                self._conns.append(parent)
                self._pending.append({0: loop.create_future()})
                self._exited.append(asyncio.Event())
                starting = loop.run_in_executor(None, proc.start)
                try:
                    await asyncio.shield(starting)
                finally:
                    # Interrupted (Ctrl-C) meanwhile: the start still finishes, so that
                    # close() finds a process it can stop, not one half-made.
                    await asyncio.wait({starting})
                    child.close()
                fdio.watch_blocking(parent.fileno(), self._on_reply, i)
                loop.add_reader(proc.sentinel, self._on_exit, i)
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.gather(*(self._pending[i][0] for i in range(self.size)))
        except TimeoutError:
            self.arena.unlink()
            raise DevstateError(f"{self.name}: workers did not start within "
                                f"{START_TIMEOUT_S:.0f} s") from None
        except BaseException:
            # A start that fails (no process, no descriptor left) may be left unclosed by
            # a caller whose __aenter__ raised: the arena's name must not outlive it.
            self.arena.unlink()
            raise
        finally:
            for pending in self._pending:
                ready = pending.pop(0, None)
                if ready is not None:
                    ready.cancel()  # nobody waits for it any more: no "never retrieved"
        # Every worker has mapped the arena: drop the name so no exit can leak it.
        self.arena.unlink()

    async def call(self, worker: int, command: Any, *, fd: int | None = None) -> Any:
        """Send ``command`` to one worker and return its reply's value.

        Raises :class:`WorkerLost` if the worker dies first, :class:`WorkerFailed` if it
        reports an error. With ``fd``, the descriptor is passed right after the command.
        """
        if worker in self._lost:
            raise self._lost[worker]
        if self._closed:
            raise DevstateError(f"{self.name}: the pool is closed")
        req = self._next_req
        self._next_req += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[worker][req] = fut
        try:
            self._conns[worker].send(m.Request(req, command))
            if fd is not None:
                send_handle(self._conns[worker], fd, self._procs[worker].pid)
        except OSError:
            # The pipe broke: the worker is exiting. Its sentinel closes a moment later;
            # wait for it (bounded) so the error carries the exit code.
            self._pending[worker].pop(req, None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._exited[worker].wait()
            raise self._lost.get(worker) or WorkerLost(
                worker, self._procs[worker].exitcode, type(command).__name__) from None
        try:
            reply: m.Reply = await fut
        finally:
            self._pending[worker].pop(req, None)
        if not reply.ok:
            raise WorkerFailed(worker, f"{type(command).__name__}: {reply.error_type}: "
                                       f"{reply.error}") from _RemoteTraceback(reply.traceback)
        return reply.value

    async def call_all(self, commands: dict[int, Any]) -> dict[int, Any]:
        """Send one command to each of several workers; the first failure wins."""
        workers = list(commands)
        async with background(*(self.call(i, commands[i]) for i in workers)) as tasks:
            await asyncio.gather(*tasks)  # the first failure ends the block, and the rest
        return {i: task.result() for i, task in zip(workers, tasks, strict=True)}

    async def cancel(self, workers: list[int], within: float = CANCEL_TIMEOUT_S) -> None:
        """Cancel the running Save or Load of each of ``workers``; return within about
        ``within`` s whatever they do. A worker that does not acknowledge in time is
        killed (SIGKILL): from then on it is lost (:meth:`lost` names it, and why), and
        its devices with it. A lost worker is not raised; any other failure is, after."""
        if not workers:
            return
        async with background(*(self.call(w, m.Cancel()) for w in workers)) as tasks:
            await asyncio.wait(tasks, timeout=within)
            for w, task in zip(workers, tasks, strict=True):
                if not task.done():
                    await self._kill(w, f"cancelling: no acknowledgement within {within:g} s,"
                                        " killed")
            await asyncio.wait(tasks)  # the killed ones' calls fail at once
        for task in tasks:
            if not task.cancelled() and task.exception() is not None \
                    and not isinstance(task.exception(), WorkerLost):
                raise task.exception()  # type: ignore[misc]

    async def _kill(self, worker: int, why: str) -> None:
        """Kill a worker that stopped answering; its pending calls fail with a WorkerLost
        that says ``why``."""
        proc = self._procs[worker]
        if proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)  # a stopped process dies too
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._exited[worker].wait()
        self._lost[worker] = lost = WorkerLost(worker, proc.exitcode, why)
        for fut in self._pending[worker].values():
            if not fut.done():
                fut.set_exception(lost)

    def _on_reply(self, worker: int) -> None:
        conn = self._conns[worker]
        try:
            while conn.poll():
                reply: m.Reply = conn.recv()
                fut = self._pending[worker].get(reply.req)
                if fut is not None and not fut.done():
                    if reply.req == 0 and not reply.ok:
                        fut.set_exception(DevstateError(
                            f"{self.name} worker {worker} failed to start: "
                            f"{reply.error_type}: {reply.error}"))
                    else:
                        fut.set_result(reply)
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())

    def _on_exit(self, worker: int) -> None:
        loop = asyncio.get_running_loop()
        proc = self._procs[worker]
        loop.remove_reader(proc.sentinel)
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(self._conns[worker].fileno())
        proc.join(0)
        self._exited[worker].set()
        if self._closed:
            return
        # Killed by _kill, it is already lost, with the reason.
        lost = self._lost.setdefault(worker, WorkerLost(worker, proc.exitcode))
        for fut in self._pending[worker].values():
            if not fut.done():
                fut.set_exception(lost)

    def lost(self) -> dict[int, WorkerLost]:
        """Workers that died while the pool was open, checked now (not at the next loop pass).

        A peer can notice a worker's death (its channel closing) before this loop has run
        the sentinel callback; polling the sentinels here lets the caller name the real
        cause.
        """
        alive = {self._procs[i].sentinel: i for i in range(len(self._procs))
                 if i not in self._lost and self._procs[i].pid is not None}
        for sentinel in mp_connection.wait(list(alive), timeout=0):
            self._on_exit(alive[sentinel])  # type: ignore[index]
        return dict(self._lost)

    def alive(self) -> list[int]:
        """The workers not lost (checked now, as :meth:`lost` checks)."""
        lost = self.lost()
        return [i for i in range(self.size) if i not in lost]

    def runnable(self, worker: int) -> bool:
        """Whether ``worker``'s main thread, which runs its loop, is on a CPU or waiting for
        one now (state R): neither stopped (SIGSTOP) nor blocked. A worker that has not
        answered yet but is runnable is starved, not frozen
        (:mod:`devstate.migration.liveness` counts it so)."""
        pid = self._procs[worker].pid
        if pid is None or worker in self._lost:
            return False
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read()
        except OSError:  # exited
            return False
        # "pid (comm) state ...": the name may hold spaces and parentheses, the state
        # follows its last ")".
        state = fields[fields.rindex(b")") + 2:].split(b" ", 1)[0]
        return state == b"R"

    async def close(self) -> None:
        """Shut every worker down (politely, then by force) and release the arena."""
        if self._closed:
            return
        for i in range(len(self._procs)):
            if i not in self._lost and self._procs[i].is_alive():
                with contextlib.suppress(OSError, ValueError):
                    self._conns[i].send(m.Request(0, m.Shutdown()))
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for proc in self._procs:
            if proc.pid is None:
                continue  # never started
            await loop.run_in_executor(None, proc.join, max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                await loop.run_in_executor(None, proc.join, 1.0)
            if proc.is_alive():
                proc.kill()
                await loop.run_in_executor(None, proc.join, 1.0)
        for i, conn in enumerate(self._conns):
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(conn.fileno())
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(self._procs[i].sentinel)
            conn.close()
        for proc in self._procs:
            # Its sentinel and Popen go now, not whenever the last reference to a lost
            # worker's error (which names the process) is collected.
            with contextlib.suppress(ValueError):  # still running after kill(): keep it
                proc.close()
        for pending in self._pending:
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(DevstateError(f"{self.name}: the pool was closed"))
        if self.arena is not None:
            self.arena.close()
