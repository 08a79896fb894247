"""The source side: a running machine whose state migrates out.

Runs in: the source coordinator process, on uvloop.

Sequence of one migration (main channel messages in capitals)::

    setup   estimate the downtime (devstate.planning.cost); over the limit: stop here, VM running
            (or, with params.wait_for_limit, re-estimate until it fits the limit as it is then)
            connect main channel, HELLO (id, device table, channels, mode) -> destination
            every worker connects the data channels it owns      (all before the stop)
            <- READY (destination validated, devices in RESUMING, channels adopted)
    active  Save starts; with precopy, devices that support it stream while the VM runs
            until the re-estimate meets the limit (or fail, VM running, past the bound)
            [pre-switchover: await the controller's go-ahead, VM running]
    t0      stop (a live guest: its vCPUs out of KVM_RUN, t0 when the last one is), then
            SwitchOver: every worker gets its devices in parallel and streams them
            <- LOADED (every device put and its digest verified)
            COMMIT -> (from here the source will not resume: the destination will)
            <- RESUMED, received at t1
            <- REPORT: per-device results [and digests, if asked, compared here], and when
               the destination's last worker resumed, on our clock (the same clock on one
               host; across hosts shifted by the READY exchange, an upper bound by one
               main-channel latency, as t1 is): downtime = that - t0, at most t1 - t0
            [on_lease: the main channel stays open, the destination's lease on the VM]

Any failure before COMMIT cancels the workers, tells the destination to discard (ABORT),
resumes every device here and raises :class:`MigrationFailed` naming the cause. A failure
after COMMIT leaves the source stopped with its state intact (the destination may be
running): resuming would risk two running copies; unless the destination says FAILED with
``running: false`` (its resume failed and it stopped and reset every device), when the
source resumes: exactly one side runs the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

from devstate.config.params import MigrationParams
from devstate.config.spec import RUNNING_BACKENDS, MachineConfig
from devstate.errors import (
    DevstateError,
    DowntimeLimitUnmet,
    DowntimeOverrun,
    MigrationFailed,
    describe,
)
from devstate.lifecycle import background, no_gc_pauses
from devstate.migration import clock, liveness
from devstate.migration.commit import RESUMED_TIMEOUT_S, SourceCommit
from devstate.migration.deadline import Deadline
from devstate.migration.dirty import RamPrecopy
from devstate.migration.machine import VM_OWNER, Machine, OnMachine
from devstate.net import channels
from devstate.net.route import Routes
from devstate.phase import Phase
from devstate.planning.cost import Estimate, HostCosts
from devstate.protocol import wire
from devstate.protocol.control import Abort, Loaded, MigrationHello, Ready, Report
from devstate.report.guest import GuestReport
from devstate.report.migration import (
    SHARDED_MODE,
    DeviceReport,
    DeviceResult,
    MigrationReport,
)
from devstate.report.progress import SaveProgress
from devstate.report.ram import RamReport
from devstate.report.vcpus import KvmReport, VcpuCost
from devstate.worker import jobs as m

log = logging.getLogger("devstate.migration.source")
T = TypeVar("T")

# How often a migration waiting for its downtime limit re-makes the estimate.
LIMIT_POLL_S = 0.1
# How long a failed save waits for the destination's own account of the failure.
PEER_REASON_WAIT_S = 1.0


class FailedAfterCommit(MigrationFailed):
    """A migration that failed after COMMIT: the source stays stopped with its state.
    ``destination_runs`` when the destination said RESUMED (the VM runs there: what failed
    is only the report), else whether it runs is unknown."""

    def __init__(self, message: str, *, destination_runs: bool) -> None:
        super().__init__(message)
        self.destination_runs = destination_runs


class Outgoing(OnMachine):
    """Migrations out of ``machine`` (its pool, plan and device table), one at a time."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self.last_estimate: Estimate | None = None  # of the last migrate(), before its stop
        self.deadline = Deadline(machine)
        # A live guest's RAM, precopied while the guest runs (None: no guest RAM).
        self.ram = RamPrecopy(machine) if machine.spec.live else None
        self._ready_ns = 0  # when the last migration's READY arrived
        self._ready_clock: str | None = None  # the monotonic clock it said it reads

    async def migrate(self, address: channels.Address, *, tls: channels.TlsConfig | None = None,
                      compare_digests: bool = False, costs: HostCosts | None = None,
                      on_status: Callable[[Phase], None] | None = None,
                      before_stop: Callable[[], Awaitable[None]] | None = None,
                      on_lease: Callable[[channels.Channel], None] | None = None
                      ) -> MigrationReport:
        """Migrate the machine to the destination listening at ``address`` (over TLS with
        ``tls``: the destination's certificate is checked against ``tls.ca``).

        Before the stop, the cost model (``costs``: this host's constants) estimates the
        downtime; with ``params.downtime_limit_ms`` an estimate above the limit raises
        :class:`DowntimeLimitUnmet` and nothing stops, unless ``params.force_switchover``,
        or ``params.wait_for_limit`` (the VM runs on, the estimate is re-made until it fits
        the limit as it is then). A stop-and-copy that passes the limit finishes and reports
        the overrun, or with ``Overrun.ABORT`` is cancelled (:class:`DowntimeOverrun`; the
        source resumes).

        ``on_status`` is called with each :class:`Phase` the migration enters: SETUP,
        ACTIVE (estimating, VM running), PRE_SWITCHOVER (with ``before_stop``), DEVICE (the
        VM stopped: stop-and-copy), then COMPLETED, FAILED, or CANCELLING and CANCELLED on
        an abort. ``before_stop`` is awaited with everything ready for the stop, the VM
        still running (a controller's pause-before-switchover). ``on_lease`` takes the main
        channel of a completed migration, open (:mod:`devstate.migration.lease`);
        without it the channel closes.
        """
        status = on_status or (lambda _: None)
        status(Phase.SETUP)
        costs = costs or HostCosts()
        status(Phase.ACTIVE)
        made = self.last_estimate = await self.deadline.estimate(costs)
        precopy = self._precopy_devices()
        if not precopy:
            made = await self._within_limit(made, costs, status)
        migration_id = uuid.uuid4()
        bound = liveness.peer_bound(self.params, made.expected_ms)
        sock = await self._open_main(address, tls, migration_id, status)
        commit = SourceCommit()
        leased = False
        try:
            await self._setup(sock, address, tls, migration_id, compare_digests, bound)
            t0, t1, made = await self._stop_and_copy(sock, costs, precopy, made, commit,
                                                     bound, status, before_stop)
            report = await self._finish(sock, t0, t1, made, compare_digests)
            status(Phase.COMPLETED)
            if on_lease is not None:
                on_lease(sock)
                leased = True
            return report
        except BaseException as exc:
            await self._fail(sock, exc, commit, status)
        finally:
            if not leased:
                sock.close()

    def _precopy_devices(self) -> tuple[int, ...]:
        """The devices that stream while the VM runs: a live guest's RAM ranges always (a
        migration of a running guest is live, as QEMU's is), VFIO devices with PRE_COPY
        when ``params.precopy`` asks; none in sequential mode."""
        if not self.params.concurrent:
            return ()
        return tuple(d.index for d in self.table
                     if d.stream is not None and d.stream.precopy
                     and (d.ram is not None or self.params.precopy))

    async def _within_limit(self, made: Estimate, costs: HostCosts,
                            status: Callable[[Phase], None]) -> Estimate:
        """Before a stop without precopy: an estimate within the downtime limit. Over it,
        raise :class:`DowntimeLimitUnmet`, or with ``params.wait_for_limit`` keep the VM
        running and re-estimate every LIMIT_POLL_S against the limit as it is then (a
        controller may raise it meanwhile, or cancel)."""
        while True:
            limit = self.params.downtime_limit_ms
            if limit is None or made.expected_ms <= limit or self.params.force_switchover:
                return made
            if not self.params.wait_for_limit:
                status(Phase.FAILED)
                raise DowntimeLimitUnmet(limit, made.expected_ms, made.explain())
            await asyncio.sleep(LIMIT_POLL_S)
            made = self.last_estimate = await self.deadline.estimate(costs)

    async def _open_main(self, address: channels.Address, tls: channels.TlsConfig | None,
                         migration_id: uuid.UUID, status: Callable[[Phase], None]
                         ) -> channels.Channel:
        """Connect the main channel; a failure here leaves everything as it was."""
        try:
            return await channels.open_channel(address, channels.hello(
                wire.ChannelKind.MAIN, 0, self.routes.channels, migration_id,
                tls=tls is not None), tls)
        except DevstateError as exc:
            status(Phase.FAILED)
            raise MigrationFailed(f"migration failed, source still running: main channel: "
                                  f"{exc}") from exc

    async def _stop_and_copy(self, sock: channels.Channel, costs: HostCosts,
                             precopy: tuple[int, ...],
                             made: Estimate, commit: SourceCommit, bound: liveness.PeerBound,
                             status: Callable[[Phase], None],
                             before_stop: Callable[[], Awaitable[None]] | None
                             ) -> tuple[int, int, Estimate]:
        """Save (precopy first, if any), [await ``before_stop``], stop the VM, finish the
        save, commit; return the stop and resume times (ns) and the estimate the switchover
        was made on. Until the commit, heartbeats go out while every worker here answers,
        and a destination silent for ``bound`` ends it (:mod:`~devstate.migration.liveness`).
        """
        if self.ram is not None:
            self.ram.rounds = 0  # until this migration's precopy starts: no RAM report
        ram = self.ram if self.ram is not None and set(self.ram.ranges) & set(precopy) \
            else None
        try:
            return await self._save_and_commit(sock, costs, precopy, made, commit, bound,
                                               status, before_stop, ram)
        finally:
            if ram is not None:
                await ram.stop()

    async def _save_and_commit(self, sock: channels.Channel, costs: HostCosts,
                               precopy: tuple[int, ...], made: Estimate,
                               commit: SourceCommit, bound: liveness.PeerBound,
                               status: Callable[[Phase], None],
                               before_stop: Callable[[], Awaitable[None]] | None,
                               ram: RamPrecopy | None) -> tuple[int, int, Estimate]:
        """:meth:`_stop_and_copy`, with ``ram`` the live RAM in precopy (its dirty log on
        from before the first round until this returns)."""
        gen = self.machine.next_gen()
        await self.machine.prepare_vcpus(self.params.concurrent)
        if ram is not None:
            await ram.start()
        save = self.pool.call_all({
            w: m.Save(self.plan.devices_of(w), self.params.schedule, self.routes, gen,
                      self.params.vcpu_cpus,
                      self.params.vcpu_threads_for(self.params.concurrent),
                      self.params.bandwidth_limit, self.params.cap_stop_copy, precopy,
                      self.deadline.transfer_order(costs))
            for w in range(self.plan.workers)})
        loaded = liveness.expect(sock, Loaded, bound, "destination", "the save and load")
        async with background(save, loaded) as (saving, loading), \
                liveness.SideAnswers(self.pool) as answers, \
                liveness.Heartbeats(sock, bound, answers) as beats:
            try:
                # The destination giving up meanwhile (its own liveness bound, say) ends
                # the wait too: a guest is not stopped for a migration already failed.
                if precopy:
                    made = self.last_estimate = await _unless_ended(
                        self.deadline.converge(saving, costs, precopy, ram), saving, loading)
                else:
                    await self._armed(gen, saving, loading)
                if before_stop is not None:
                    status(Phase.PRE_SWITCHOVER)
                    await _unless_ended(before_stop(), saving, loading)
            except DevstateError as exc:
                await _peer_reason_first(loading, exc)
                raise
            with no_gc_pauses():
                # A live guest's downtime starts when its last vCPU left KVM_RUN (the
                # owner's clock is this host's): the RAM ranges and vCPUs are read after.
                # The VM's owner switches over on its own as soon as the guest stopped
                # (its vCPUs are the stop's longest path); the others once told.
                stopped = await self.machine.stop_guest(switch_over=True)
                t0 = stopped or time.monotonic_ns()
                if ram is not None:
                    ram.stopped(t0)
                self.machine.running = False
                status(Phase.DEVICE)
                await self.pool.call_all({w: m.SwitchOver() for w in range(self.plan.workers)
                                          if not stopped or w != VM_OWNER})
                await self.deadline.within_limit(self._alongside_peer(saving, loading), t0, made)
                await beats.stop()  # nothing may follow COMMIT on the channel
                t1 = await commit.commit(sock, bound)
        return t0, t1, made

    async def _armed(self, gen: int, saving: asyncio.Future[Any],
                     loading: asyncio.Future[Any]) -> None:
        """Return once every worker's Save is set up and waits for the stop (its set-up is
        then not part of the downtime); a Save or load that ended first raises its error."""
        armed = await _unless_ended(self.pool.call_all({w: m.Armed(gen)
                                                        for w in range(self.plan.workers)}),
                                    saving, loading)
        if not all(armed.values()):  # a Save ended unarmed: its own reply says why
            await asyncio.wait({saving})
            saving.result()
            raise MigrationFailed("the save ended before the stop")

    async def _finish(self, sock: channels.Channel, t0: int, t1: int, made: Estimate,
                      compare_digests: bool) -> MigrationReport:
        """After the resume, off the critical path: both sides' results, joined."""
        async with asyncio.timeout(RESUMED_TIMEOUT_S):
            report = await channels.expect(sock, Report)
        saved = m.unpack_results(await self.pool.call_all(
            {w: m.Results() for w in range(self.plan.workers)}))
        kvm = KvmReport.of(await self.machine.vcpu_cost(), VcpuCost.from_json(report.kvm))
        # Stopped for good, the source's state is final (precopy devices kept running, and
        # changing, until the stop): compare its digests with the destination's now.
        ours = await self.machine.digests() if compare_digests else {}
        return self._report(t0, t1, saved, report, ours, made, kvm)

    async def _fail(self, sock: channels.Channel, exc: BaseException, commit: SourceCommit,
                    status: Callable[[Phase], None]) -> NoReturn:
        """Decide what a failure leaves, act on it, and raise what the caller should see:

        ========================================  ==========================================
        failure                                   outcome
        ========================================  ==========================================
        after COMMIT (destination may run)        stay stopped with the state; MigrationFailed
        a device or worker lost here              the rest resumed; MigrationFailed naming it
        DowntimeOverrun (abort on overrun)        resumed; CANCELLED; the overrun is raised
        DowntimeLimitUnmet (precopy unconverged)  resumed (it never stopped); raised as is
        cancel, interrupt                         resumed; the interruption goes on
        any other DevstateError, OSError, timeout resumed; MigrationFailed naming the cause
        ========================================  ==========================================
        """
        aborting = isinstance(exc, DowntimeOverrun)
        status(Phase.CANCELLING if aborting else Phase.FAILED)
        if not commit.may_resume(exc):
            there = ("the destination runs the VM" if commit.resumed
                     else "the destination may be running")
            log.info("migration failed after commit (%s): %s; the source stays stopped",
                     describe(exc), there)
            raise FailedAfterCommit(f"failed after commit ({describe(exc)}); {there}: the "
                                    "source stays stopped with its state",
                                    destination_runs=commit.resumed) from exc
        broken = await self._recover(sock, exc)
        if broken is not None:  # the root cause of whatever followed
            raise MigrationFailed(f"migration failed: {broken}; the VM cannot run on "
                                  "either side: the other devices resumed here, these "
                                  "are gone") from broken
        if aborting:
            status(Phase.CANCELLED)
            raise exc
        if isinstance(exc, DowntimeLimitUnmet) or \
                not isinstance(exc, DevstateError | OSError | TimeoutError):
            raise exc
        raise MigrationFailed(f"migration failed, source resumed: {exc}") from exc

    @property
    def expected_ms(self) -> float | None:
        """The last migration's expected downtime, once estimated."""
        return self.last_estimate.expected_ms if self.last_estimate else None

    async def progress(self) -> SaveProgress:
        """The save so far, from every worker (cheap: one small round trip each); usable
        while :meth:`migrate` runs, and after it, for the last migration."""
        replies = await self.pool.call_all({w: m.Progress() for w in range(self.plan.workers)})
        return SaveProgress(sum(done for done, _ in replies.values()), len(self.table),
                            sum(read for _, read in replies.values()),
                            sum(v.size for v in self.machine.spec.vfio))

    @property
    def routes(self) -> Routes:
        """This side's channel map: which worker sends on which channel, and how."""
        return Routes(self.params.data_channels, self.plan.workers, self.params.routing)

    async def _setup(self, sock: Any, address: channels.Address,
                     tls: channels.TlsConfig | None, migration_id: uuid.UUID,
                     compare_digests: bool, bound: liveness.PeerBound) -> None:
        """Handshake and open data channels, until the destination is READY."""
        routes = self.routes
        n = routes.channels
        await channels.send(sock, MigrationHello(
            str(migration_id), self.table.handshake(), n, routes.routing.value,
            self.params.concurrent, compare_digests, self.params.chunk_bytes,
            bound.seconds))
        ready = await self._alongside_peer(self.pool.call_all({
            w: m.ConnectChannels(address, tuple(
                (k, channels.hello(wire.ChannelKind.DATA, k, n, migration_id,
                                   tls=tls is not None))
                for k in routes.channels_of(w)), tls)
            for w in range(self.plan.workers)}),
            channels.expect(sock, Ready))
        self._ready_ns = time.monotonic_ns()
        self._ready_clock = ready.clock

    async def _alongside_peer(self, work: Awaitable[Any], reply: Awaitable[T]) -> T:
        """Await the workers' ``work`` and the destination's ``reply`` together; the first
        failure wins, except that the destination's own account of a failure is preferred.

        Work that fails on a data channel is often the echo of a failure at the destination,
        which closes its channels and says why on the main channel: give that reason a
        moment to arrive, as it names the cause.
        """
        async with background(work, reply) as (working, replying):
            done, _ = await asyncio.wait({working, replying},
                                         return_when=asyncio.FIRST_EXCEPTION)
            failure = working.exception() if working in done else None
            if failure is not None:
                await _peer_reason_first(replying, failure)
            for task in done:
                task.result()  # raises the first failure
            await working
            result: T = await replying
            return result

    async def _recover(self, sock: Any, cause: BaseException) -> DevstateError | None:
        """Undo a failed migration: abort the destination, cancel workers, resume devices.

        Returns what keeps the VM from running here, if anything: a lost worker (its
        devices died with it) or a device that would not resume (its model died).
        """
        with contextlib.suppress(Exception):
            await channels.send(sock, Abort(describe(cause)))
        broken: DevstateError | None = None
        try:  # bounded: a frozen worker is killed, and its devices are lost with it
            await self.pool.cancel(self.pool.alive())
        except DevstateError as exc:  # keep recovering the others; say what failed
            log.warning("while recovering (Cancel): %s", exc)
        try:
            await self.pool.call_all({w: m.Resume() for w in self.pool.alive()})
        except DevstateError as exc:
            log.warning("while recovering (Resume): %s", exc)
            broken = exc
        lost = self.pool.lost()
        if lost:
            broken = lost[min(lost)]
        self.machine.running = broken is None
        # The command that started it says the error (the CLI prints it, QMP's controller
        # logs it and shows it in query-migrate): here only what the recovery did.
        log.info("migration failed (%s): %s", describe(cause),
                 "resumed on the source" if broken is None else
                 f"the source cannot resume ({describe(broken)})")
        return broken

    def _report(self, t0: int, t1: int, saved: list[DeviceResult], report: Report,
                ours: dict[str, str], made: Estimate, kvm: KvmReport | None
                ) -> MigrationReport:
        loaded = map(DeviceResult.from_json, report.devices)
        dest = {r.id: r for r in loaded}
        after = report.digests
        guest = GuestReport.from_json(report.guest)
        # A live guest's vCPUs and VM-level state change as soon as it runs again: what
        # proves they arrived is the guest going on from where it stopped, not a digest.
        running = {d.id for d in self.table if d.backend in RUNNING_BACKENDS} \
            if guest is not None else set()
        # The destination's times are on its own clock (another host's, perhaps).
        shift = clock.shift_to_ours(self._ready_ns, report.ready_ns, self._ready_clock)
        rows = []
        for r in sorted(saved, key=lambda r: r.index):
            d = dest.get(r.id)
            if d is None:
                raise DevstateError(f"destination did not report {r.id}")
            verified = (guest.continued if r.id in running and guest is not None
                        else bool(ours) and ours.get(r.id) == after.get(r.id))
            rows.append(DeviceReport.join(r, d, t0=t0, shift=shift, verified=verified))
        mode = ("sequential" if not self.params.concurrent
                else SHARDED_MODE if self.params.sharded_vms else "concurrent")
        # The downtime ends when the VM runs on the destination: its last worker resumed
        # (a live guest: its last vCPU released into KVM_RUN), on our clock (across hosts
        # an upper bound by one channel latency, as RESUMED's arrival is).
        # RESUMED itself is one more hop through busy processes, and hundreds of vCPUs
        # waking at once on a few cores can hold it up far longer, which then says more
        # about the host's scheduler than about the guest. Both are in the report.
        resumed_seen_ms = (t1 - t0) / 1e6
        if report.resumed_ns:
            t1 = min(t1, report.resumed_ns + shift)
        return MigrationReport(mode, self.plan.workers, (t1 - t0) / 1e6, tuple(rows),
                               digests_compared=bool(ours), expected_ms=made.expected_ms,
                               critical_path=made.explain(),
                               downtime_limit_ms=self.params.downtime_limit_ms,
                               destination_params=report.params, kvm=kvm, guest=guest,
                               resumed_seen_ms=resumed_seen_ms if report.resumed_ns else None,
                               ram=self.ram.report(saved) if self.ram and self.ram.rounds
                               else None)


async def _unless_ended(wait: Awaitable[T], *work: asyncio.Future[Any]) -> T:
    """Await ``wait`` and return what it gives; a save or load that ends first (the
    destination failed, say) raises its error, or MigrationFailed if it ended without one."""
    async with background(wait) as (waiting,):
        await asyncio.wait({waiting, *work}, return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            result: T = waiting.result()
            return result
        for ended in work:
            if ended.done():
                ended.result()
        raise MigrationFailed("the migration ended before the switchover")


async def _peer_reason_first(reply: asyncio.Future[Any], ours: BaseException) -> None:
    """Raise the destination's own account of a failure (``reply`` failing within
    PEER_REASON_WAIT_S) in place of ``ours``, its echo on this side; else return."""
    if not reply.done():
        await asyncio.wait({reply}, timeout=PEER_REASON_WAIT_S)
    if reply.done() and not reply.cancelled() and reply.exception() is not None:
        raise reply.exception() from ours  # type: ignore[misc]


class SourceVM(Machine):
    """A machine that starts with its seeded state, running, and migrates out."""

    def __init__(self, spec: MachineConfig, params: MigrationParams) -> None:
        super().__init__(spec, params, incoming=False, side="source")
        self.outgoing = Outgoing(self)

    @property
    def last_estimate(self) -> Estimate | None:
        """The last migration's estimate, made before its stop."""
        return self.outgoing.last_estimate

    @property
    def expected_ms(self) -> float | None:
        """The last migration's expected downtime, once estimated."""
        return self.outgoing.expected_ms

    async def migrate(self, address: channels.Address, *, tls: channels.TlsConfig | None = None,
                      compare_digests: bool = False, costs: HostCosts | None = None,
                      on_status: Callable[[Phase], None] | None = None) -> MigrationReport:
        """:meth:`Outgoing.migrate` of this machine."""
        return await self.outgoing.migrate(address, tls=tls, compare_digests=compare_digests,
                                           costs=costs, on_status=on_status)

    async def estimate(self, costs: HostCosts,
                       remaining: dict[int, int] | None = None) -> Estimate:
        """:meth:`Deadline.estimate` of this machine."""
        return await self.outgoing.deadline.estimate(costs, remaining)

    async def progress(self) -> SaveProgress:
        """:meth:`Outgoing.progress` of this machine."""
        return await self.outgoing.progress()

    def ram_progress(self) -> RamReport | None:
        """The guest RAM's precopy so far, while one is under way (None otherwise)."""
        ram = self.outgoing.ram
        return ram.progress() if ram is not None and ram.on else None
