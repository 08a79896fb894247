"""The VM as a migration controller drives it: QMP's commands over one machine.

Runs in: the ``devstate vm --qmp`` process, on uvloop, next to :mod:`devstate.qmp.server`.

A controller written for QEMU (libvirt, ``qemu.qmp`` scripts) drives devstate the way it
drives QEMU: ``migrate-set-parameters`` / ``-capabilities``, ``migrate`` (or, on the
destination, ``migrate-incoming``), ``MIGRATION`` events or ``query-migrate`` until the
status ends, ``migrate_cancel``. What QEMU's names mean here:

* parameters: ``downtime-limit`` (ms: no switchover while the cost model expects more),
  ``max-bandwidth`` (bytes/s over all channels; 0: no cap, devstate's default),
  ``multifd-channels`` (data channels); devstate's own as ``x-routing`` (affinity |
  spread), ``x-overrun`` (finish | abort), ``x-workers`` (read-only: the pool is started);
* capabilities: ``events`` (MIGRATION events), ``multifd`` (off: one data channel),
  ``return-path`` (always on: the two-phase commit needs it), ``switchover-ack``
  (precopy: devices that support it stream while the VM runs, the stop waits until the
  estimate allows it); anything else is refused, saying so.

The migration runs in a task of its own, never in a client's: a client that goes away
mid-migration does not disturb it. A VM starts as a source (seeded state, ``running``) or,
started ``--incoming``, as a destination (``inmigrate`` until its migration completes); a
VM that arrived by migration can migrate out again, and one that migrated out (devstate's
extension: QEMU's would have to restart) can take ``migrate-incoming`` to receive it back,
so two processes can pass a VM back and forth.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from devstate.config.params import MigrationParams
from devstate.config.spec import MachineConfig
from devstate.errors import DevstateError, describe
from devstate.migration.destination import Incoming
from devstate.migration.machine import Machine
from devstate.migration.source import Outgoing
from devstate.net.channels import Listener, parse_uri
from devstate.net.tls import TlsConfig
from devstate.phase import Phase
from devstate.planning.cost import CostHistory
from devstate.qmp import options
from devstate.qmp.commands import Command, Param, QmpError
from devstate.qmp.status import Migration, RunState
from devstate.worker import jobs as m

log = logging.getLogger("devstate.qmp.controller")

QUIT_GRACE_S = 0.05


class Controller:
    """One machine, its migration state, and the QMP commands over both.

    ``incoming`` is None for a source, ``"defer"`` for a destination that waits for
    ``migrate-incoming``, or the URI to listen on at once. ``emit`` sends a QMP event.
    """

    def __init__(self, spec: MachineConfig, params: MigrationParams, *, incoming: str | None,
                 emit: Callable[[str, dict[str, Any]], None],
                 tls: TlsConfig | None = None, history: CostHistory | None = None) -> None:
        self.spec = spec
        self.params = params
        self._incoming = incoming
        self._emit = emit
        self._tls = tls
        self._history = history or CostHistory()
        self._vm: Machine | None = None
        self._out: Outgoing | None = None  # keeps what its estimates probed across runs
        self.state = RunState.INMIGRATE if incoming is not None else RunState.RUNNING
        self.migration: Migration | None = None
        self._task: asyncio.Task[None] | None = None
        self._cancelling = False
        self._outgoing = False  # the migration in self.migration leaves this VM
        self._capabilities = dict(options.DEFAULT_CAPABILITIES)
        self.quitting = asyncio.Event()
        self.ready: str | None = None  # where an incoming migration is listened for

    async def __aenter__(self) -> Controller:
        vm = Machine(self.spec, self.params, incoming=self._incoming is not None, side="vm")
        self._vm = vm  # closed by close() whatever happens next
        await vm.start()
        self._out = Outgoing(vm)
        if self._incoming not in (None, "defer"):
            self._listen(self._incoming, exit_on_error=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel a migration in progress (the source recovers), stop the machine."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._vm is not None:
            await self._vm.close()

    # -- the commands ------------------------------------------------------------------

    def commands(self) -> list[Command]:
        """The QMP command table of this machine."""
        return [
            Command("query-status", self._query_status),
            Command("stop", self._stop),
            Command("cont", self._cont),
            Command("migrate", self._migrate,
                    (Param("uri", str), Param("detach", bool, False),
                     Param("resume", bool, False), Param("blk", bool, False),
                     Param("inc", bool, False))),
            Command("migrate-incoming", self._migrate_incoming,
                    (Param("uri", str), Param("exit-on-error", bool, False))),
            Command("query-migrate", self._query_migrate),
            Command("migrate_cancel", self._migrate_cancel),
            Command("migrate-set-parameters", self._set_parameters,
                    (Param("downtime-limit", int, False), Param("max-bandwidth", int, False),
                     Param("multifd-channels", int, False), Param("x-routing", str, False),
                     Param("x-overrun", str, False), Param("x-workers", int, False))),
            Command("query-migrate-parameters", self._query_parameters),
            Command("migrate-set-capabilities", self._set_capabilities,
                    (Param("capabilities", list),)),
            Command("query-migrate-capabilities", self._query_capabilities),
            Command("quit", self._quit),
        ]

    async def _query_status(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"status": str(self.state), "running": self.state is RunState.RUNNING,
                "singlestep": False}

    async def _stop(self, _: dict[str, Any]) -> None:
        if self.state is RunState.RUNNING and not self._active():
            await self._machine().pool.call_all({w: m.Pause() for w in range(self._workers)})
            self._set_state(RunState.PAUSED)
            self._vm_event("STOP")
        elif self.state is not RunState.PAUSED:
            raise QmpError("GenericError", f"cannot stop a VM that is {self.state}"
                           + (" (a migration is in progress)" if self._active() else ""))

    async def _cont(self, _: dict[str, Any]) -> None:
        if self.state is RunState.PAUSED:
            await self._machine().pool.call_all({w: m.Resume() for w in range(self._workers)})
            self._set_state(RunState.RUNNING)
            self._vm_event("RESUME")
        elif self.state is RunState.POSTMIGRATE:
            raise QmpError("GenericError", "the VM migrated out: it runs on the destination "
                                           "now; resuming it here would run two copies")
        elif self.state is RunState.INMIGRATE:
            raise QmpError("GenericError", "the VM is waiting for an incoming migration; it "
                                           "runs once that completes")

    async def _migrate(self, args: dict[str, Any]) -> None:
        if args.get("resume") or args.get("blk") or args.get("inc"):
            raise QmpError("GenericError", "devstate supports neither postcopy resume nor "
                                           "block migration")
        vm = self._machine()
        if self._active():
            raise QmpError("GenericError", "There's a migration process in progress")
        if self.state is RunState.POSTMIGRATE:
            raise QmpError("GenericError", "the VM already migrated out")
        if self.state is RunState.INMIGRATE:
            raise QmpError("GenericError", "the VM is waiting for an incoming migration: it "
                                           "has nothing to migrate out yet")
        address = _parse(args["uri"])
        self.migration = Migration()
        self._cancelling = False
        self._outgoing = True
        self._task = asyncio.get_running_loop().create_task(self._run_outgoing(vm, address))

    async def _migrate_incoming(self, args: dict[str, Any]) -> None:
        if self._active() or self.ready is not None:
            raise QmpError("GenericError", "The incoming migration has already been started")
        waiting = self.state is RunState.INMIGRATE and self._incoming == "defer"
        if not waiting and self.state is not RunState.POSTMIGRATE:
            raise QmpError("GenericError", "The incoming migration needs the VM started with "
                                           "--incoming defer, or migrated out")
        self._listen(args["uri"], exit_on_error=args.get("exit-on-error", True))
        self._set_state(RunState.INMIGRATE)  # listening: its task starts after this returns

    async def _query_migrate(self, _: dict[str, Any]) -> dict[str, Any]:
        if self.migration is None:
            return {}
        made = self._out.last_estimate if self._out is not None else None
        if self._outgoing and made is not None:
            self.migration.expected_ms = made.expected_ms
            self.migration.critical_path = made.explain()
        return self.migration.info()

    async def _migrate_cancel(self, _: dict[str, Any]) -> None:
        # Like QEMU: succeeds with nothing to cancel.
        if self._task is None or self._task.done() or self._cancelling:
            return
        if not self._outgoing:
            raise QmpError("GenericError", "cancel the migration on its source")
        self._cancelling = True
        self._migration_status(Phase.CANCELLING)
        self._task.cancel()

    async def _set_parameters(self, args: dict[str, Any]) -> None:
        if self._active():
            raise QmpError("GenericError", "There's a migration process in progress")
        self._configure(**options.parameter_changes(args, self.params))

    async def _query_parameters(self, _: dict[str, Any]) -> dict[str, Any]:
        return options.query_parameters(self.params)

    async def _set_capabilities(self, args: dict[str, Any]) -> None:
        if self._active():
            raise QmpError("GenericError", "There's a migration process in progress")
        self._capabilities = options.merge_capabilities(self._capabilities,
                                                        args["capabilities"])
        self._configure(**options.capability_changes(self._capabilities))

    async def _query_capabilities(self, _: dict[str, Any]) -> list[dict[str, Any]]:
        return options.query_capabilities(self._capabilities)

    async def _quit(self, _: dict[str, Any]) -> None:
        # The reply goes out first (the session writes it a few loop passes after this
        # returns, and closing flushes what was written); then everything closes in order.
        asyncio.get_running_loop().call_later(QUIT_GRACE_S, self.quitting.set)

    # -- migrations ----------------------------------------------------------------------

    async def _run_outgoing(self, vm: Machine, address: Any) -> None:
        migration, out = self.migration, self._out
        assert migration is not None and out is not None
        costs = self._history.load()
        out.last_estimate = None  # query-migrate shows this migration's, once it is made
        try:
            report = await out.migrate(address, compare_digests=True, costs=costs,
                                       on_status=self._source_status)
        except asyncio.CancelledError:
            self._after_failure(vm, Phase.CANCELLED, "cancelled by migrate_cancel")
            if not self._cancelling:
                raise  # the process is closing: let the cancellation go on
        except (DevstateError, OSError) as exc:
            ended = Phase.CANCELLED if self._cancelling else Phase.FAILED
            self._after_failure(vm, ended, describe(exc))
        else:
            migration.report = report
            migration.ended = time.monotonic()
            if out.last_estimate is not None:
                self._history.save_run(costs, out.last_estimate, report.downtime_ms)
            self._set_state(RunState.POSTMIGRATE)
            self._migration_status(Phase.COMPLETED)

    def _source_status(self, status: Phase) -> None:
        migration = self.migration
        assert migration is not None
        if status == Phase.ACTIVE and migration.setup_done is None:
            migration.setup_done = time.monotonic()
        if status == Phase.DEVICE:  # the stop: QEMU's STOP event, and finish-migrate
            self._set_state(RunState.FINISH_MIGRATE)
            self._vm_event("STOP")
        if status in (Phase.FAILED, Phase.CANCELLING, Phase.CANCELLED, Phase.COMPLETED):
            return  # said by _run_outgoing, once the outcome is known
        self._migration_status(status)

    def _after_failure(self, vm: Machine, status: Phase, why: str) -> None:
        migration = self.migration
        assert migration is not None
        migration.error = why
        migration.ended = time.monotonic()
        stopped = self.state is RunState.FINISH_MIGRATE
        self._set_state(RunState.RUNNING if vm.running else RunState.POSTMIGRATE)
        if stopped and vm.running:
            self._vm_event("RESUME")
        self._migration_status(status)

    def _listen(self, uri: str, *, exit_on_error: bool) -> None:
        listener = Listener(_parse(uri))
        try:
            listener.open()
        except (DevstateError, OSError) as exc:
            raise QmpError("GenericError", f"cannot listen on {uri}: {describe(exc)}") from exc
        self.ready = str(listener.address)
        self.migration = Migration(listening=self.ready)
        self._outgoing = False
        self._task = asyncio.get_running_loop().create_task(
            self._run_incoming(listener, exit_on_error))

    async def _run_incoming(self, listener: Listener, exit_on_error: bool) -> None:
        migration = self.migration
        vm = self._vm
        assert migration is not None and vm is not None
        try:
            self._migration_status(Phase.ACTIVE)
            migration.setup_done = time.monotonic()
            result = await Incoming(vm).accept_migration(listener, self._tls)
        finally:
            listener.close()
            self.ready = None
        migration.ended = time.monotonic()
        if result.completed:
            self._set_state(RunState.RUNNING)
            self._vm_event("RESUME")
            self._migration_status(Phase.COMPLETED)
            return
        migration.error = result.reason
        self._migration_status(Phase.FAILED)
        if exit_on_error:  # QEMU's default since 9.1: the destination process ends
            log.warning("incoming migration failed: %s; exiting", result.reason)
            self.quitting.set()

    # -- helpers -------------------------------------------------------------------------

    @property
    def _workers(self) -> int:
        return self._machine().plan.workers

    def _machine(self) -> Machine:
        if self._vm is None:
            raise QmpError("GenericError", "the VM is not started")
        return self._vm

    def _active(self) -> bool:
        return self._task is not None and not self._task.done()

    def _configure(self, **changes: Any) -> None:
        self.params = dataclasses.replace(self.params, **changes)
        if self._vm is not None:
            self._vm.params = self.params

    def _set_state(self, state: RunState) -> None:
        self.state = state
        if self._vm is not None:
            self._vm.running = state is RunState.RUNNING

    def _migration_status(self, status: Phase) -> None:
        assert self.migration is not None
        if self.migration.status == status:
            return
        self.migration.status = status
        if self._capabilities["events"]:
            self._emit("MIGRATION", {"status": str(status)})

    def _vm_event(self, name: str) -> None:
        self._emit(name, {})


def _parse(uri: str) -> Any:
    try:
        return parse_uri(uri)
    except DevstateError as exc:
        raise QmpError("GenericError", f"Invalid migration URI '{uri}': {exc}") from exc
