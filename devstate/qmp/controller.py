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
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from devstate.config.params import MigrationParams, Overrun, Routing
from devstate.config.spec import MachineConfig
from devstate.errors import DevstateError, describe
from devstate.migration.destination import Incoming
from devstate.migration.machine import Machine
from devstate.migration.source import Outgoing
from devstate.net.channels import Listener, parse_uri
from devstate.net.transport import TlsConfig
from devstate.phase import Phase
from devstate.planning.cost import CostHistory
from devstate.qmp.server import Command, Param, QmpError
from devstate.report.migration import MigrationReport
from devstate.worker import jobs as m

log = logging.getLogger("devstate.qmp.controller")

# QEMU's bounds (migration/options.c): downtime-limit up to 2000 s, channels 1-255.
MAX_DOWNTIME_LIMIT_MS = 2_000_000
MAX_CHANNELS = 255
# Capabilities a QEMU controller may set, and what devstate does with them.
HONOURED = ("events", "multifd", "return-path", "switchover-ack")
KNOWN = (*HONOURED, "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress",
         "postcopy-ram", "x-colo", "release-ram", "block", "pause-before-switchover",
         "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
         "background-snapshot", "zero-copy-send", "postcopy-preempt", "dirty-limit",
         "mapped-ram")
QUIT_GRACE_S = 0.05


class RunState(enum.StrEnum):
    """``query-status``'s status: QEMU's RunState names that apply here."""

    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"


@dataclasses.dataclass(slots=True)
class Migration:
    """One migration as ``query-migrate`` shows it (times from ``time.monotonic``)."""

    status: Phase = Phase.NONE
    started: float = dataclasses.field(default_factory=time.monotonic)
    setup_done: float | None = None
    ended: float | None = None
    expected_ms: float | None = None
    critical_path: str = ""
    report: MigrationReport | None = None
    error: str = ""
    listening: str = ""  # an incoming migration's address (port 0 resolved)

    def info(self) -> dict[str, Any]:
        """QEMU's MigrationInfo fields that apply, and devstate's own under ``devstate``."""
        now = self.ended if self.ended is not None else time.monotonic()
        info: dict[str, Any] = {"status": str(self.status),
                                "total-time": round((now - self.started) * 1e3)}
        if self.setup_done is not None:
            info["setup-time"] = round((self.setup_done - self.started) * 1e3)
        if not self.status.ended and self.expected_ms is not None:
            info["expected-downtime"] = round(self.expected_ms)
        if self.error:
            info["error-desc"] = self.error
        ours: dict[str, Any] = {"critical-path": self.critical_path}
        if self.listening:
            ours["incoming"] = self.listening
        if self.report is not None:
            if self.status is Phase.COMPLETED:
                info["downtime"] = round(self.report.downtime_ms)
            info["vfio"] = {"transferred": sum(d.bytes for d in self.report.devices
                                               if d.id.startswith("vfio/"))}
            ours.update(self.report.to_json())
        info["devstate"] = ours
        return info


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
        self._capabilities = {"events": False, "multifd": True, "return-path": True,
                              "switchover-ack": False}
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
        changes: dict[str, Any] = {}
        if "downtime-limit" in args:
            changes["downtime_limit_ms"] = _bounded(args, "downtime-limit", 0,
                                                    MAX_DOWNTIME_LIMIT_MS)
        if "max-bandwidth" in args:
            changes["bandwidth_limit"] = _bounded(args, "max-bandwidth", 0, 2**62) or None
        if "multifd-channels" in args:
            changes["channels"] = _bounded(args, "multifd-channels", 1, MAX_CHANNELS)
        if "x-routing" in args:
            changes["routing"] = _choice(args, "x-routing", Routing)
        if "x-overrun" in args:
            changes["overrun"] = _choice(args, "x-overrun", Overrun)
        if "x-workers" in args and args["x-workers"] != self.params.workers:
            raise QmpError("GenericError", f"Parameter 'x-workers' is fixed at "
                                           f"{self.params.workers} once the VM has started "
                                           "(devstate vm --workers)")
        self._configure(**changes)

    async def _query_parameters(self, _: dict[str, Any]) -> dict[str, Any]:
        s = self.params
        return {"downtime-limit": s.downtime_limit_ms if s.downtime_limit_ms is not None
                else 0,
                "max-bandwidth": int(s.bandwidth_limit or 0),
                "multifd-channels": s.data_channels,
                "x-routing": s.routing.value, "x-overrun": s.overrun.value,
                "x-workers": s.workers}

    async def _set_capabilities(self, args: dict[str, Any]) -> None:
        if self._active():
            raise QmpError("GenericError", "There's a migration process in progress")
        wanted: dict[str, bool] = {}
        for k, item in enumerate(args["capabilities"]):
            if not isinstance(item, dict) or set(item) != {"capability", "state"} \
                    or not isinstance(item["capability"], str) \
                    or not isinstance(item["state"], bool):
                raise QmpError("GenericError", f"capabilities[{k}]: expected "
                                               "{\"capability\": string, \"state\": boolean}")
            name, state = item["capability"], item["state"]
            if name not in KNOWN:
                raise QmpError("GenericError", f"Parameter 'capability' does not accept value "
                                               f"'{name}'")
            if name not in HONOURED and state:
                raise QmpError("GenericError", f"capability '{name}' is not supported by "
                                               "devstate")
            if name == "return-path" and not state:
                raise QmpError("GenericError", "devstate always uses its return path: the "
                                               "destination acknowledges before the source "
                                               "lets go of its state (two-phase commit)")
            wanted[name] = state
        merged = {**self._capabilities, **wanted}
        self._capabilities = merged
        self._configure(precopy=merged["switchover-ack"],
                        channels=None if merged["multifd"] else 1)

    async def _query_capabilities(self, _: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"capability": name, "state": self._capabilities.get(name, False)}
                for name in KNOWN]

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


def _bounded(args: dict[str, Any], name: str, low: int, high: int) -> int:
    value = args[name]
    if not low <= value <= high:
        raise QmpError("GenericError", f"Parameter '{name}' expects a value between {low} "
                                       f"and {high}")
    return int(value)


def _choice(args: dict[str, Any], name: str, kind: type[enum.Enum]) -> Any:
    try:
        return kind(args[name])
    except ValueError:
        accepted = ", ".join(str(k.value) for k in kind)
        raise QmpError("GenericError", f"Parameter '{name}' expects one of: "
                                       f"{accepted}") from None

