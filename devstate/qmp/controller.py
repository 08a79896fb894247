"""The VM as a migration controller drives it: QMP's commands over one machine.

Runs in: the ``devstate vm --qmp`` process, on uvloop, next to :mod:`devstate.qmp.server`.

A controller written for QEMU (libvirt, ``qemu.qmp`` scripts) drives devstate the way it
drives QEMU: ``migrate-set-parameters`` / ``-capabilities``, ``object-add`` of TLS
credentials, ``migrate`` (or, on the destination, ``migrate-incoming``), ``MIGRATION``
events or ``query-migrate`` until the status ends, ``migrate-continue`` at
``pre-switchover``, ``migrate_cancel``. What QEMU's parameters and capabilities mean here
is :mod:`devstate.qmp.options`' (and docs/qmp.md's).

The migration runs in a task of its own, never in a client's: a client that goes away
mid-migration does not disturb it. A VM starts as a source (seeded state, ``running``) or,
started ``--incoming``, as a destination (``inmigrate`` until its migration completes); a
VM that arrived by migration can migrate out again, and one that migrated out (devstate's
extension: QEMU's would have to restart) can take ``migrate-incoming`` to receive it back,
so two processes can pass a VM back and forth.

After a completed migration the two sides keep the main channel as the destination's lease
on the VM (:mod:`devstate.migration.lease`): ``cont`` on the ``postmigrate`` source is
allowed once the destination has said it runs nothing, and refused while it may run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from devstate.config.params import MigrationParams
from devstate.config.spec import MachineConfig
from devstate.errors import DevstateError, describe
from devstate.migration import lease
from devstate.migration.destination import Incoming
from devstate.migration.machine import Machine
from devstate.migration.source import FailedAfterCommit, Outgoing
from devstate.net.channels import Address, Channel, Listener, parse_uri
from devstate.net.tls import TlsConfig
from devstate.net.transport import HELLO_TIMEOUT_S
from devstate.phase import Phase
from devstate.planning.cost import CostHistory
from devstate.qmp import options
from devstate.qmp.commands import Command, Param, QmpError
from devstate.qmp.objects import TLS_CREDS_X509, TlsCreds, tls_creds
from devstate.qmp.status import Migration, RunState
from devstate.worker import jobs as m

log = logging.getLogger("devstate.qmp.controller")

QUIT_GRACE_S = 0.05
# How long ``cont`` lets a lease's last word, already sent, be read before deciding: the
# destination says it runs nothing before its process ends, so by the time a controller
# sees it gone the word is in this host's socket buffer.
LEASE_SETTLE_S = 0.5
# QEMU's SHUTDOWN event for ``quit`` (qapi/run-state.json, ShutdownCause host-qmp-quit).
SHUTDOWN_ON_QUIT = {"guest": False, "reason": "host-qmp-quit"}


class Controller:
    """One machine, its migration state, and the QMP commands over both.

    ``incoming`` is None for a source, ``"defer"`` for a destination that waits for
    ``migrate-incoming``, or the URI to listen on at once. ``emit`` sends a QMP event.
    ``tls`` is the command line's TLS for incoming migrations (``tls-creds`` replaces it).
    ``exit_code`` is what the process should exit with once ``quitting`` is set: 1 after
    a failed incoming migration ended it (QEMU's exit-on-error), else 0.
    """

    def __init__(self, spec: MachineConfig, params: MigrationParams, *, incoming: str | None,
                 emit: Callable[[str, dict[str, Any]], None],
                 tls: TlsConfig | None = None, history: CostHistory | None = None,
                 hello_timeout_s: float = HELLO_TIMEOUT_S) -> None:
        self.spec = spec
        self._hello_timeout_s = hello_timeout_s  # what a stranger gets to say its hello
        self.base = params  # the process's own settings; QMP's are applied over them
        self._parameters = options.Parameters()
        self._capabilities = dict(options.DEFAULT_CAPABILITIES)
        self.params = self._effective()
        self._incoming = incoming
        self._emit = emit
        self._tls = tls
        self._history = history or CostHistory()
        self._objects: dict[str, TlsCreds] = {}
        self._vm: Machine | None = None
        self._out: Outgoing | None = None  # keeps what its estimates probed across runs
        self.state = RunState.INMIGRATE if incoming is not None else RunState.RUNNING
        self.migration: Migration | None = None
        self._task: asyncio.Task[None] | None = None
        self._cancelling = False
        self._outgoing = False  # the migration in self.migration leaves this VM
        self._go = asyncio.Event()  # migrate-continue, at pre-switchover
        self._watching: asyncio.Task[bool] | None = None  # source: the destination's lease
        self._lease: Channel | None = None  # destination: our lease on the VM we run
        self.quitting = asyncio.Event()
        self.exit_code = 0
        self.ready: str | None = None  # where an incoming migration is listened for

    async def __aenter__(self) -> Controller:
        # The pool and arena are laid out for the process's own settings (its most data
        # channels); QMP's parameters apply to each migration (self._configure).
        vm = Machine(self.spec, self.base, incoming=self._incoming is not None, side="vm")
        self._vm = vm  # closed by close() whatever happens next
        await vm.start()
        self._configure()
        self._out = Outgoing(vm)
        if self._incoming not in (None, "defer"):
            self._listen(self._incoming, exit_on_error=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel a migration in progress (the source recovers), stop the machine; a
        destination running the VM then tells its source that nothing runs here."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._stop_watching()
        if self._vm is not None:
            await self._vm.close()
        if self._lease is not None:
            await lease.release(self._lease, "the destination VM ended")
            self._lease = None

    # -- the commands ------------------------------------------------------------------

    def commands(self) -> list[Command]:
        """The QMP command table of this machine."""
        return [
            Command("query-status", self._query_status),
            Command("stop", self._stop),
            Command("cont", self._cont),
            Command("migrate", self._migrate,
                    (Param("uri", str), Param("detach", bool, False),
                     Param("resume", bool, False))),
            Command("migrate-incoming", self._migrate_incoming,
                    (Param("uri", str), Param("exit-on-error", bool, False))),
            Command("query-migrate", self._query_migrate),
            Command("migrate_cancel", self._migrate_cancel),
            Command("migrate-continue", self._migrate_continue, (Param("state", str),)),
            Command("migrate-set-parameters", self._set_parameters,
                    options.parameter_arguments()),
            Command("query-migrate-parameters", self._query_parameters),
            Command("migrate-set-capabilities", self._set_capabilities,
                    (Param("capabilities", list),)),
            Command("query-migrate-capabilities", self._query_capabilities),
            Command("object-add", self._object_add,
                    (Param("qom-type", str), Param("id", str), Param("dir", str, False),
                     Param("endpoint", str, False), Param("verify-peer", bool, False))),
            Command("object-del", self._object_del, (Param("id", str),)),
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
        if self.state is RunState.POSTMIGRATE:
            await self._destination_let_go()
        elif self.state is RunState.INMIGRATE:
            raise QmpError("GenericError", "the VM is waiting for an incoming migration; it "
                                           "runs once that completes")
        if self.state in (RunState.PAUSED, RunState.POSTMIGRATE):
            await self._machine().pool.call_all({w: m.Resume() for w in range(self._workers)})
            self._set_state(RunState.RUNNING)
            self._vm_event("RESUME")

    async def _destination_let_go(self) -> None:
        """Return if the VM that migrated out runs nowhere (its destination said so on
        its lease), else raise saying why ``cont`` would risk two running copies."""
        watching = self._watching
        if watching is None:
            raise QmpError("GenericError", "the VM migrated out and its last migration did "
                                           "not complete: the destination may run it, and "
                                           "resuming here could run two copies")
        await asyncio.wait({watching}, timeout=LEASE_SETTLE_S)
        if not watching.done():
            raise QmpError("GenericError", "the VM runs on the destination (it completed the "
                                           "migration and has not let go of the VM): "
                                           "resuming here would run two copies")
        if not watching.result():
            raise QmpError("GenericError", "the destination's hold on the VM ended without "
                                           "its word that it runs nothing (killed, cut off, "
                                           "or the VM migrated on): it may be running, and "
                                           "resuming here could run two copies")
        self._watching = None

    async def _migrate(self, args: dict[str, Any]) -> None:
        if args.get("resume"):
            raise QmpError("GenericError", "devstate does not support postcopy, so there "
                                           "is no paused postcopy migration to resume")
        vm = self._machine()
        if self._active():
            raise QmpError("GenericError", "There's a migration process in progress")
        if self.state is RunState.POSTMIGRATE:
            raise QmpError("GenericError", "the VM already migrated out")
        if self.state is RunState.INMIGRATE:
            raise QmpError("GenericError", "the VM is waiting for an incoming migration: it "
                                           "has nothing to migrate out yet")
        address = _parse(args["uri"])
        tls = self._tls_creds("client")
        self._configure()
        self._stop_watching()
        self.migration = Migration()
        self._cancelling = False
        self._outgoing = True
        self._go = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run_outgoing(vm, address, tls))

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
        ram = self._out.ram if self._out is not None else None
        if self._outgoing and ram is not None and ram.rounds and ram.on:
            self.migration.ram = ram.progress()
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

    async def _migrate_continue(self, args: dict[str, Any]) -> None:
        state = args["state"]
        if state not in {str(p) for p in Phase}:
            raise QmpError("GenericError", f"Parameter 'state' does not accept value "
                                           f"'{state}'")
        current = self.migration.status if self.migration is not None else Phase.NONE
        if str(current) != state or current is not Phase.PRE_SWITCHOVER:
            raise QmpError("GenericError", f"Migration not in expected state: {current}")
        self._go.set()

    async def _set_parameters(self, args: dict[str, Any]) -> None:
        self._parameters = options.set_parameters(
            self._parameters, args, workers=self.base.workers, migrating=self._active())
        self._configure()

    async def _query_parameters(self, _: dict[str, Any]) -> dict[str, Any]:
        return options.query_parameters(self._parameters, workers=self.base.workers)

    async def _set_capabilities(self, args: dict[str, Any]) -> None:
        if self._active():
            raise QmpError("GenericError", "There's a migration process in progress")
        self._capabilities = options.set_capabilities(self._capabilities,
                                                      args["capabilities"])
        self._configure()

    async def _query_capabilities(self, _: dict[str, Any]) -> list[dict[str, Any]]:
        return options.query_capabilities(self._capabilities)

    async def _object_add(self, args: dict[str, Any]) -> None:
        kind, name = args["qom-type"], args["id"]
        if kind != TLS_CREDS_X509:
            raise QmpError("GenericError", f"Parameter 'qom-type' does not accept value "
                                           f"'{kind}' (devstate has {TLS_CREDS_X509} only)")
        if name in self._objects:
            raise QmpError("GenericError", f"attempt to add duplicate property '{name}' to "
                                           "object (type 'container')")
        props = {k: v for k, v in args.items() if k not in ("qom-type", "id")}
        self._objects[name] = tls_creds(props)

    async def _object_del(self, args: dict[str, Any]) -> None:
        if self._objects.pop(args["id"], None) is None:
            raise QmpError("GenericError", f"object '{args['id']}' not found")

    async def _quit(self, _: dict[str, Any]) -> None:
        # The reply goes out first (the session writes it a few loop passes after this
        # returns, and closing flushes what was written), then SHUTDOWN, as QEMU orders
        # them; then everything closes in order.
        def shut_down() -> None:
            self._emit("SHUTDOWN", dict(SHUTDOWN_ON_QUIT))
            self.quitting.set()

        asyncio.get_running_loop().call_later(QUIT_GRACE_S, shut_down)

    # -- migrations ----------------------------------------------------------------------

    async def _run_outgoing(self, vm: Machine, address: Address,
                            tls: TlsConfig | None) -> None:
        migration, out = self.migration, self._out
        assert migration is not None and out is not None
        costs = self._history.load()
        out.last_estimate = None  # query-migrate shows this migration's, once it is made
        pause = self._capabilities[options.Capability.PAUSE_BEFORE_SWITCHOVER]
        try:
            report = await out.migrate(address, tls=tls, compare_digests=True, costs=costs,
                                       on_status=self._source_status,
                                       before_stop=self._continued if pause else None,
                                       on_lease=self._watch)
        except asyncio.CancelledError:
            self._after_failure(vm, Phase.CANCELLED, "cancelled by migrate_cancel")
            if not self._cancelling:
                raise  # the process is closing: let the cancellation go on
        except FailedAfterCommit as exc:
            # Past COMMIT a cancel cancels nothing: the VM runs on the destination, or may.
            self._after_commit(vm, exc)
        except (DevstateError, OSError) as exc:
            # Cancelled means the source runs on (a controller then carries on there); a
            # source that lost devices cannot, whatever asked it to stop: that failed.
            ended = Phase.CANCELLED if self._cancelling and vm.running else Phase.FAILED
            self._after_failure(vm, ended, describe(exc))
        else:
            migration.report = report
            migration.ended = time.monotonic()
            if out.last_estimate is not None:
                self._history.save_run(costs, out.last_estimate, report.downtime_ms)
            self._completed_out()

    async def _continued(self) -> None:
        """pause-before-switchover: at pre-switchover, wait for ``migrate-continue``."""
        await self._go.wait()

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

    def _watch(self, main: Channel) -> None:
        """Keep the completed migration's main channel: the destination's lease."""
        self._watching = asyncio.get_running_loop().create_task(lease.released(main))

    def _stop_watching(self) -> None:
        if self._watching is not None:
            self._watching.cancel()  # closes its channel
            self._watching = None

    def _after_commit(self, vm: Machine, exc: FailedAfterCommit) -> None:
        """A failure after COMMIT, as it is: COMPLETED if the destination said it runs
        the VM (only the report is missing: the error says why), else FAILED; never
        CANCELLED, whatever ``migrate_cancel`` asked."""
        if not exc.destination_runs:
            self._after_failure(vm, Phase.FAILED, describe(exc))
            return
        migration = self.migration
        assert migration is not None
        migration.error = describe(exc)
        migration.ended = time.monotonic()
        log.warning("migration completed, but: %s", migration.error)
        self._completed_out()

    def _completed_out(self) -> None:
        """The VM runs on the destination now."""
        if self._lease is not None:  # it arrived here by migration and moved on
            lease.hand_on(self._lease)
            self._lease = None
        self._set_state(RunState.POSTMIGRATE)
        self._migration_status(Phase.COMPLETED)

    def _after_failure(self, vm: Machine, status: Phase, why: str) -> None:
        migration = self.migration
        assert migration is not None
        migration.error = why
        migration.ended = time.monotonic()
        if status is Phase.FAILED:  # nobody else says it: QMP's client sees only a status
            log.warning("migration failed: %s", why)
        stopped = self.state is RunState.FINISH_MIGRATE
        self._set_state(RunState.RUNNING if vm.running else RunState.POSTMIGRATE)
        if stopped and vm.running:
            self._vm_event("RESUME")
        self._migration_status(status)

    def _listen(self, uri: str, *, exit_on_error: bool) -> None:
        tls = self._tls_creds("server") or self._tls
        listener = Listener(_parse(uri), hello_timeout_s=self._hello_timeout_s)
        try:
            listener.open()
        except (DevstateError, OSError) as exc:
            raise QmpError("GenericError", describe(exc)) from exc  # it names the address
        self._configure()
        self._stop_watching()  # the VM comes back: whatever its last destination says
        self.ready = str(listener.address)
        self.migration = Migration(listening=listener.address)
        self._outgoing = False
        self._migration_status(Phase.SETUP)
        self._task = asyncio.get_running_loop().create_task(
            self._run_incoming(listener, tls, exit_on_error))

    async def _run_incoming(self, listener: Listener, tls: TlsConfig | None,
                            exit_on_error: bool) -> None:
        migration = self.migration
        vm = self._vm
        assert migration is not None and vm is not None

        def accepted() -> None:
            migration.setup_done = time.monotonic()
            self._migration_status(Phase.ACTIVE)

        try:
            result = await Incoming(vm).accept_migration(listener, tls, on_accepted=accepted,
                                                         keep_lease=True)
        finally:
            listener.close()
            self.ready = None
        migration.ended = time.monotonic()
        if result.completed:
            self._lease = result.lease
            self._set_state(RunState.RUNNING)
            self._vm_event("RESUME")
            self._migration_status(Phase.COMPLETED)
            return
        migration.error = result.reason
        self._migration_status(Phase.FAILED)
        log.warning("incoming migration failed: %s%s", result.reason,
                    "; exiting" if exit_on_error else "")
        if exit_on_error:  # QEMU's default since 9.1: the destination process exits 1
            self.exit_code = 1
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

    def _tls_creds(self, endpoint: str) -> TlsConfig | None:
        """The TLS of the next migration from ``tls-creds`` (None: no TLS), checked now."""
        name = self._parameters.tls_creds
        if not name:
            return None
        creds = self._objects.get(name)
        if creds is None:
            raise QmpError("GenericError", f"No TLS credentials with id '{name}'")
        if creds.endpoint != endpoint:
            raise QmpError("GenericError", f"Expecting TLS credentials with a {endpoint} "
                                           "endpoint")
        return creds.config(self._parameters.tls_hostname)

    def _effective(self) -> MigrationParams:
        return options.migration_params(self.base, self._parameters, self._capabilities)

    def _configure(self) -> None:
        # The running migration reads the machine's params as it goes: only the live
        # parameters (options.SETTINGS) may change while it runs.
        self.params = self._effective()
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
        if self._capabilities[options.Capability.EVENTS]:
            self._emit("MIGRATION", {"status": str(status)})

    def _vm_event(self, name: str) -> None:
        self._emit(name, {})


def _parse(uri: str) -> Address:
    try:
        return parse_uri(uri)
    except DevstateError as exc:
        raise QmpError("GenericError", f"Invalid migration URI '{uri}': {exc}") from exc
