"""The guest running on this process's KVM VM: its vCPUs executing the guest program in
guest RAM, each in KVM_RUN on a thread of the run engine (:mod:`.run`).

Runs in: the VM's owner worker (only it may issue KVM_RUN: the owner rule). A source's
vCPUs *enter* the program (registers set by :func:`.guest.enter`); a destination's start
from the state a migration loaded into them, which is the point of the exercise: a wrong
bit in that state, or in the RAM that moved with it, stops the guest's counters or makes
it write a failure code (:mod:`.guest`), which the destination's continuity check reads.
"""

from __future__ import annotations

from devstate.devices.kvm import guest
from devstate.devices.kvm.ram import GuestRam
from devstate.devices.kvm.run import RunnerState, VcpuRunner
from devstate.devices.kvm.vm import KvmVm


class LiveGuest:
    """The vCPUs of ``vm`` running the guest in ``ram``, started, stopped and resumed."""

    def __init__(self, vm: KvmVm, ram: GuestRam) -> None:
        self.vm = vm
        self.layout = guest.GuestLayout.of(len(vm.vcpus), ram.size)
        self._runner: VcpuRunner | None = None

    def start(self, *, paused: bool) -> None:
        """A thread per vCPU. A source's vCPUs enter the program and run; a destination's
        threads are made now but park (``paused``) until :meth:`resume` sends them into
        KVM_RUN with the state a migration loaded: thread creation stays off the downtime."""
        vcpus = [self.vm.vcpus[i] for i in sorted(self.vm.vcpus)]
        if not paused:
            for index, vcpu in enumerate(vcpus):
                guest.enter(vcpu, index, self.layout)
        self._runner = VcpuRunner(vcpus)
        self._runner.start(paused=paused)

    def stop(self) -> int:
        """Every vCPU out of KVM_RUN; monotonic ns of the last one (0 if none ran, or all
        were stopped already: a paused VM that migrates)."""
        if self._runner is None or self._runner.state is RunnerState.STOPPED:
            return 0
        return self._runner.stop()  # a broken runner says so here

    def arm(self) -> None:
        """Wake the stopped vCPU threads to the entry barrier ahead of :meth:`resume`
        (:meth:`VcpuRunner.arm`); nothing if they are not stopped."""
        if self._runner is not None and self._runner.state is RunnerState.STOPPED:
            self._runner.arm()

    def resume(self) -> int:
        """Every vCPU back in KVM_RUN; monotonic ns when they were released (0: it was
        running: a source recovering from a migration that failed before its stop)."""
        if self._runner is None or self._runner.state is RunnerState.RUNNING:
            return 0
        return self._runner.resume()

    def problem(self) -> str | None:
        """The exits the guest should never make (a fault, a triple fault, port I/O), as
        the runner saw them, or None."""
        faults = self._runner.faults if self._runner is not None else ()
        if not faults:
            return None
        return "; ".join(str(f.error()) for f in faults[:3]) + \
            (f" (and {len(faults) - 3} more vCPUs)" if len(faults) > 3 else "")

    def close(self) -> None:
        """Stop and join every vCPU thread. Idempotent."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None
