"""What the devices owned by one process share: that process's KVM VM, its vCPU batch, and
the guest's RAM and running vCPUs when the machine is a live guest.

A KVM VM answers only the process that created it (the owner rule, ARCHITECTURE.md §3),
so the worker that owns the kvm vCPUs holds the VM, made when its first vCPU (or VM-level
device) opens and closed with its last vCPU, and the batch its vCPUs get and put with.
The worker creates one :class:`DeviceHost` and hands it to every device it makes;
nothing here is module-global.

Guest RAM is a memfd the coordinator passes to every worker: each maps it (the RAM ranges
are read and written by whichever worker owns them), and the VM's owner also gives it to
KVM and runs the vCPUs on it (:class:`~devstate.devices.kvm.live.LiveGuest`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from devstate.errors import DeviceError

if TYPE_CHECKING:
    from devstate.devices.kvm.batch import VcpuBatch
    from devstate.devices.kvm.dirty import DirtyLog
    from devstate.devices.kvm.live import LiveGuest
    from devstate.devices.kvm.ram import GuestRam
    from devstate.devices.kvm.vm import KvmVm
    from devstate.report.vcpus import VcpuCost


class DeviceHost:
    """One process's shared device resources."""

    def __init__(self) -> None:
        self._vm: KvmVm | None = None
        self._batch: VcpuBatch | None = None
        self._ram: GuestRam | None = None
        self._guest: LiveGuest | None = None
        self._dirty: DirtyLog | None = None

    @property
    def live(self) -> bool:
        """Whether this process holds guest RAM: its vCPUs run a guest, not seeded state."""
        return self._ram is not None

    def attach_ram(self, fd: int, size: int) -> None:
        """Map the guest's RAM (``fd`` is the caller's to close); before any vCPU opens."""
        from devstate.devices.kvm.ram import GuestRam

        if self._ram is not None:
            raise DeviceError("guest-ram", "already mapped in this worker")
        self._ram = GuestRam.attach(fd, size)

    def guest_ram(self) -> GuestRam:
        """The guest's RAM as mapped here; DeviceError if the machine has none."""
        if self._ram is None:
            raise DeviceError("guest-ram", "not mapped in this worker")
        return self._ram

    def kvm_vm(self) -> KvmVm:
        """This process's KVM VM, created on first use (irqchip and PIT before any vCPU)."""
        if self._vm is None:
            from devstate.devices.kvm.vm import KvmVm  # only kvm machines pay for ctypes

            self._vm = KvmVm(name="kvm-shard")
            if self._ram is not None:
                self._vm.map_ram(self._ram)
        return self._vm

    def vcpu_batch(self) -> VcpuBatch:
        """The batch the VM's vCPUs get and put with (its engine chosen once, here)."""
        if self._batch is None:
            from devstate.devices.kvm.batch import VcpuBatch

            self._batch = VcpuBatch(self.kvm_vm())
        return self._batch

    @property
    def batch(self) -> VcpuBatch | None:
        """The VM's batch, if this process has a VM (None: no batched records here)."""
        return self._batch

    def vcpu_cost(self) -> VcpuCost | None:
        """What the vCPUs cost since the last ask (None: this process has no vCPUs)."""
        return self._batch.take_cost() if self._batch is not None else None

    def start_guest(self, *, paused: bool) -> None:
        """A thread per vCPU of the VM: a source's enter the guest program and run; a
        destination's (``paused``) wait for :meth:`resume_guest`."""
        from devstate.devices.kvm.live import LiveGuest

        if self._guest is not None:
            raise DeviceError("kvm", "the guest was started already")
        self._guest = LiveGuest(self.kvm_vm(), self.guest_ram())
        self._guest.start(paused=paused)

    def stop_guest(self) -> int:
        """Every vCPU out of KVM_RUN; monotonic ns of the last stop (0: no guest runs).
        While the dirty log is on, what the guest wrote since the last sync is then synced
        into the shared log: the stop-and-copy's last round."""
        if self._guest is None:
            return 0
        stopped = self._guest.stop()
        if self._dirty is not None and self._dirty.on:
            self._dirty.sync()
        return stopped

    def pause_guest(self) -> None:
        """Every vCPU out of KVM_RUN for a while (auto-converge's throttle), no more."""
        if self._guest is not None:
            self._guest.stop()

    def log_dirty(self, on: bool) -> None:
        """Start (the shared log emptied) or stop KVM's dirty log of the guest's RAM."""
        if self._dirty is None:
            if not on:
                return
            from devstate.devices.kvm.dirty import DirtyLog

            self._dirty = DirtyLog(self.kvm_vm(), self.guest_ram())
        if on:
            self._dirty.start()
        else:
            self._dirty.stop()

    def sync_dirty(self) -> tuple[tuple[int, int], ...]:
        """KVM's dirty log into the shared log; per RAM range, the pages it holds and how
        many of those were never sent (:func:`devstate.devices.kvm.dirty.per_range`)."""
        if self._dirty is None or not self._dirty.on:
            raise DeviceError("guest-ram", "the dirty log is not on")
        return self._dirty.sync()

    def arm_guest(self) -> None:
        """Wake the stopped guest's vCPU threads to their entry barrier, so that
        :meth:`resume_guest` only releases them (a destination, before its load); nothing
        without a guest."""
        if self._guest is not None:
            self._guest.arm()

    def resume_guest(self) -> int:
        """Every vCPU back in KVM_RUN (a destination's first time: from the state its
        vCPUs were loaded with); monotonic ns when the last one was released (0: no guest
        here, or it was running)."""
        return self._guest.resume() if self._guest is not None else 0

    def guest_problem(self) -> str | None:
        """What went wrong with the running vCPUs (an exit the guest never makes), or None."""
        return self._guest.problem() if self._guest is not None else None

    def close(self) -> None:
        """Stop the guest and unmap its RAM (after the devices closed). Idempotent."""
        if self._guest is not None:
            self._guest.close()
            self._guest = None
        self._dirty = None
        if self._ram is not None:
            self._ram.close()
            self._ram = None

    def release_vcpu(self, vcpu_id: int) -> None:
        """Close a vCPU of this process's VM, and the VM with its last vCPU."""
        if self._vm is None:
            return
        if self._guest is not None:  # no vCPU may close under a running thread
            self._guest.close()
            self._guest = None
        self._vm.close_vcpu(vcpu_id)
        if not self._vm.vcpus:
            self._vm.close()
            self._vm = self._batch = None
