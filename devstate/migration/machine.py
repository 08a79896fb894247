"""A machine on one side of a migration: a worker pool whose workers own its devices."""

from __future__ import annotations

import socket

from devstate.config.params import MigrationParams
from devstate.config.spec import RUNNING_BACKENDS, DeviceTable, MachineConfig
from devstate.devices import device_table
from devstate.errors import SpecError
from devstate.lifecycle import AsyncLifecycle
from devstate.migration.guest import LiveMemory
from devstate.planning.plan import Plan, make_plan, spec_order_plan
from devstate.report.vcpus import VcpuCost
from devstate.worker import jobs as m
from devstate.worker.layout import arena_layout
from devstate.worker.pool import WorkerPool

# The worker that owns the KVM VM, its VM-level state and its vCPUs (planning.plan).
VM_OWNER = 0


class Machine(AsyncLifecycle):
    """The devices of ``spec``, each owned by one worker of a pool (the owner rule).

    Runs in: a coordinator process. ``incoming`` machines open their devices blank, to be
    loaded by a migration; the others with the machine's seeded state, or, with guest RAM
    (a live guest), with the guest program running on every vCPU.
    """

    def __init__(self, spec: MachineConfig, params: MigrationParams, *, incoming: bool = False,
                 side: str = "machine") -> None:
        self.incoming = incoming
        self.side = side
        self.spec = spec
        self.table: DeviceTable = device_table(spec)  # once: a kvm record size is probed
        self.params = params
        plan = spec_order_plan if params.spec_order else make_plan
        self.plan: Plan = plan(self.table, params.workers, sharded_vms=params.sharded_vms)
        self.pool = WorkerPool(self.table, arena_layout(params, self.table), name=self.side,
                               cpus=list(params.cpus) if params.cpus else None)
        if spec.live and params.sharded_vms:
            raise SpecError("params.sharded_vms", "a live guest (a spec with [ram]) runs in "
                                                  "one KVM VM, which sharded VMs would split")
        self.memory: LiveMemory | None = None  # a live guest's RAM, as mapped here
        self.running = False
        self._gen = 0

    async def start(self) -> None:
        """Start the pool, link its workers to each other, map the guest's RAM into each,
        open every device on its owner, and run a source's guest."""
        await self.pool.start()
        if self.params.fault is not None:
            await self.pool.call_all({w: m.ArmFault(self.params.fault)
                                      for w in range(self.plan.workers)})
        await self._link_workers()
        if self.spec.live:
            self.memory = LiveMemory(self.spec, side=self.side, incoming=self.incoming)
            for w in range(self.plan.workers):
                await self.pool.call(w, m.MapRam(self.memory.ram.size), fd=self.memory.ram.fd)
        await self.pool.call_all({w: m.OpenDevices(self.plan.devices_of(w), self.incoming)
                                  for w in range(self.plan.workers)})
        if self.memory is not None:
            await self.pool.call(VM_OWNER, m.StartGuest(paused=self.incoming))
        self.running = not self.incoming

    async def stop_guest(self, *, switch_over: bool = False) -> int:
        """Stop a live guest's vCPUs; monotonic ns of the last one to stop (0: no guest).
        With ``switch_over``, the VM's owner then switches its armed Save over itself
        (:class:`~devstate.worker.jobs.StopGuest`)."""
        if self.memory is None:
            return 0
        stopped: int = await self.pool.call(VM_OWNER, m.StopGuest(switch_over))
        return stopped

    async def arm_guest(self) -> None:
        """Have the VM's owner wake a loaded guest's vCPU threads to their entry barrier
        (:class:`~devstate.worker.jobs.ArmGuest`); nothing without a guest."""
        if self.memory is not None:
            await self.pool.call(VM_OWNER, m.ArmGuest())

    async def guest_problem(self) -> str | None:
        """What the VM's owner saw go wrong with the running vCPUs, if anything."""
        if self.memory is None:
            return None
        problem: str | None = await self.pool.call(VM_OWNER, m.GuestCheck())
        return problem

    async def _link_workers(self) -> None:
        """Give every pair of workers a link for handoffs (:mod:`devstate.worker.handoff`)."""
        n = self.plan.workers
        for a in range(n):
            for b in range(a + 1, n):
                ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                try:
                    await self.pool.call(a, m.JoinMesh(b), fd=ends[0].fileno())
                    await self.pool.call(b, m.JoinMesh(a), fd=ends[1].fileno())
                finally:
                    for end in ends:  # each worker holds its own duplicate now
                        end.close()

    def next_gen(self) -> int:
        """A fresh operation number for a Save or Load (tags its handoffs)."""
        self._gen += 1
        return self._gen

    async def digests(self) -> dict[str, str]:
        """Every device's state digest (hex), by device id: for checks, off the critical path.

        A live guest's vCPUs and VM-level state are left out (``RUNNING_BACKENDS``): a
        running vCPU sits in KVM_RUN, which holds it against any other ioctl, and their
        state changes with every instruction; what proves they moved is the guest going
        on (the continuity check)."""
        table = self.table
        skip = RUNNING_BACKENDS if self.memory is not None else frozenset()
        replies = await self.pool.call_all({
            w: m.Digests(tuple(i for i in self.plan.devices_of(w) if table[i].backend not in skip))
            for w in range(self.plan.workers)})
        return {table[i].id: h for per_worker in replies.values() for i, h in per_worker.items()}

    async def close(self) -> None:
        """Stop the pool (its workers close the devices), then unmap the guest's RAM here.
        Idempotent."""
        await self.pool.close()
        if self.memory is not None:
            self.memory.close()


    async def prepare_vcpus(self, concurrent: bool) -> None:
        """Before the stop: start the threads each worker will get or put vCPUs with."""
        await self.pool.call_all({
            w: m.PrepareVcpus(self.params.vcpu_cpus, self.params.vcpu_threads_for(concurrent))
            for w in range(self.plan.workers)})

    async def vcpu_cost(self) -> VcpuCost | None:
        """What this side's KVM vCPUs cost in its last Save or Load (None: it has none)."""
        costs = await self.pool.call_all({w: m.VcpuCosts() for w in range(self.plan.workers)})
        return VcpuCost.total(costs.values())


class OnMachine:
    """What works on one machine (an outgoing or incoming migration, the deadline): the
    machine, and the parts of it that work reads."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    @property
    def pool(self) -> WorkerPool:
        """The machine's worker pool."""
        return self.machine.pool

    @property
    def plan(self) -> Plan:
        """The machine's plan: owners and orders."""
        return self.machine.plan

    @property
    def table(self) -> DeviceTable:
        """The machine's device table."""
        return self.machine.table

    @property
    def params(self) -> MigrationParams:
        """The parameters the machine's next migration runs with."""
        return self.machine.params
