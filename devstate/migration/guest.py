"""A live guest as its coordinator sees it: the guest RAM every worker maps, the program
installed in it before any vCPU runs, and the check that the guest continued after a move.

Runs in: a coordinator. It creates the RAM (a memfd) and passes it to every worker
(:class:`~devstate.worker.jobs.MapRam`); it keeps its own mapping to install the program
(source) and to read the guest's counters, failure codes and checksums (destination). It
never drives a vCPU: the VM's owner worker does (the owner rule).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

import numpy as np
import numpy.typing as npt
import psutil

from devstate.config.spec import MachineConfig
from devstate.devices.kvm import guest, guest_view
from devstate.devices.kvm.ram import PAGE_BYTES, GuestRam
from devstate.errors import SpecError
from devstate.report.guest import GuestReport

# How long the destination lets a resumed guest run before it looks: enough ticks for
# every vCPU to advance its counter many times over, even with hundreds sharing 2 cores;
# and at least this many ticks (a vCPU halted at the stop goes on at its next tick).
RUN_BEFORE_CHECK_S = 0.25
TICKS_BEFORE_CHECK = 2
# A look that finds only vCPUs not moved yet looks again, this often and this much longer
# at most: on a loaded host the first entries of hundreds of vCPUs into KVM_RUN (kvm-pvm
# builds each one's shadow page tables) can outlast the first look (a 200-vCPU guest's
# last vCPU had not run 0.25 s after its release once, in a bench on a noisy host).
LOOK_AGAIN_S = 0.05
LATE_VCPUS_S = 2.0


def check_room(spec: MachineConfig, sides: int = 1) -> None:
    """SpecError unless ``sides`` copies of the spec's guest RAM fit in what this host has
    available (a local migration holds both sides'): the guest may write all of it, so a
    spec asking for more would have the kernel's OOM killer end some process of this host
    then, instead of a clear refusal here."""
    if spec.ram is None:
        return
    need, available = sides * spec.ram.size, psutil.virtual_memory().available
    if need > available:
        copies = f" ({sides} sides on this host)" if sides > 1 else ""
        raise SpecError("ram.size", f"{need / 2**30:.1f} GiB of guest RAM{copies} does not "
                                    f"fit the {available / 2**30:.1f} GiB this host has "
                                    "available")


def guest_params(spec: MachineConfig) -> guest.GuestParams:
    """What the guest program does per tick, from the spec's ``[ram]``: its tick, and its
    dirty rate in whole pages per tick (at least one if it dirties at all), over its
    working set."""
    assert spec.ram is not None
    ram = spec.ram
    tick_ns = round(ram.tick_ms * 1e6)
    per_tick = round(ram.dirty_rate * tick_ns / 1e9)
    return guest.GuestParams(tick_ns=tick_ns,
                             dirty_pages_per_tick=max(per_tick, 1) if ram.dirty_rate else 0,
                             working_set_pages=ram.working_set // PAGE_BYTES)


class LiveMemory:
    """The guest RAM of a machine with ``[ram]``, mapped here; the program installed
    unless ``incoming`` (a destination's RAM arrives with the migration)."""

    def __init__(self, spec: MachineConfig, *, side: str, incoming: bool) -> None:
        assert spec.ram is not None
        self.layout = guest.GuestLayout.of(spec.vcpus.count, spec.ram.size)
        self._run_before_check_s = max(RUN_BEFORE_CHECK_S,
                                       TICKS_BEFORE_CHECK * spec.ram.tick_ms / 1e3)
        check_room(spec)
        self.ram = GuestRam.create(spec.ram.size, name=f"devstate-{side}-ram")
        try:
            if not incoming:
                guest.install(self.ram.view, self.layout, guest_params(spec))
        except BaseException:
            self.ram.close()
            raise

    def counters(self) -> npt.NDArray[np.uint64]:
        """Every vCPU's counter as the guest's RAM holds it now (a copy)."""
        return guest_view.GuestView(self.ram.view, self.layout).counters()

    async def continuity(self, before: npt.NDArray[np.uint64],
                         problem: Callable[[], Awaitable[str | None]]) -> GuestReport:
        """Let the resumed guest run, then judge from its RAM whether it went on from
        ``before`` (its counters at the stop); ``problem`` asks the VM's owner what went
        wrong with the vCPUs meanwhile (an exit the guest never makes), if anything. A look
        that finds only vCPUs not moved yet looks again, for ``LATE_VCPUS_S`` at most."""
        started = time.monotonic()
        await asyncio.sleep(self._run_before_check_s)
        give_up = time.monotonic() + LATE_VCPUS_S
        view = guest_view.GuestView(self.ram.view, self.layout)
        while True:
            trouble = await problem()
            seen = guest_view.continuity(before, view)
            if seen.final or trouble is not None or time.monotonic() >= give_up:
                break
            await asyncio.sleep(LOOK_AGAIN_S)
        why = "; ".join(filter(None, (trouble, seen.why)))
        return GuestReport(self.layout.vcpus, seen.vcpus_running,
                           seen.continued and trouble is None, self.ram.size,
                           (time.monotonic() - started) * 1e3, why)

    def close(self) -> None:
        """Unmap the RAM here (workers hold their own mappings). Idempotent."""
        self.ram.close()

    def __enter__(self) -> LiveMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
