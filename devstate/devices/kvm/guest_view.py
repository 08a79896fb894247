"""A live guest's progress as its host reads it from guest RAM: per-vCPU counters, failure
codes and checksums, and the continuity check that judges a guest after a migration.

Runs in: any process that maps the guest's RAM (a destination's coordinator after its
resume; tests). It never writes RAM. Where the fields live: :mod:`.guest`.

Reading a running guest: each counter is one aligned 8-byte store, never torn. A checksum
block changes with its sum inside a seqlock (the control block's SEQ is odd meanwhile), so
:meth:`GuestView.checksums` reads a vCPU's block between two equal, even SEQs and looks
again at a vCPU caught in the middle.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from devstate.devices.kvm import guest_program as gp
from devstate.devices.kvm.guest import GuestLayout, areas
from devstate.errors import DeviceError

# How long a checksum check waits for a vCPU caught mid-update to finish it: a running
# vCPU leaves the seqlock within a tick, far less than this even on busy host CPUs.
SETTLE_S = 0.5
_SETTLE_POLL_S = 0.001
# How many problems a Continuity's ``why`` names before it says how many more there are.
WHY_PROBLEMS = 4


@dataclass(frozen=True, slots=True)
class GuestFailure:
    """A vCPU that wrote a failure code: which check failed, where, and the value seen."""

    vcpu: int
    code: int
    where: int  # a register's number, or an exception's vector
    value: int

    def describe(self) -> str:
        """E.g. ``cpu/17 failure code 2 (vector register YMM0)``."""
        try:
            failure = gp.Failure(self.code)
        except ValueError:
            return f"cpu/{self.vcpu} failure code {self.code} (unknown)"
        register = gp.REGISTERS[self.where % 16]
        what = {
            gp.Failure.GENERAL_REGISTER: f"general register {register} = {self.value:#x}",
            gp.Failure.VECTOR_REGISTER: f"vector register YMM{self.where}",
            gp.Failure.CHECKSUM: f"RAM checksum: the block adds up to {self.value:#x}",
            gp.Failure.SKEW: f"registers and RAM out of step: RBX = {self.value:#x}",
            gp.Failure.STACK: f"stack pointer RSP = {self.value:#x}",
            gp.Failure.EXCEPTION: f"exception {self.where} at RIP {self.value:#x}",
        }[failure]
        return f"cpu/{self.vcpu} failure code {self.code} ({what})"


@dataclass(frozen=True, slots=True)
class ChecksumCheck:
    """The host's recount of every vCPU's checksum block against the sum the guest keeps."""

    bad: tuple[int, ...]  # vCPUs whose block does not add up to its sum
    unsettled: tuple[int, ...]  # vCPUs found mid-update at every look: not verified

    @property
    def hold(self) -> bool:
        """Whether every vCPU's checksum was verified and holds."""
        return not self.bad and not self.unsettled


class GuestView:
    """What the guest has written to its RAM, read in place, running or stopped.

    ``ram`` is the whole guest RAM as this process maps it; reads never write.
    """

    def __init__(self, ram: memoryview, layout: GuestLayout) -> None:
        if len(ram) < layout.ram_bytes:
            raise DeviceError("guest", f"view: RAM of {len(ram)} B, the layout is for "
                                       f"{layout.ram_bytes} B")
        self.layout = layout
        self._ram = ram
        self._areas = areas(ram, layout)

    @property
    def installed(self) -> bool:
        """Whether the RAM holds the program installed for this layout's vCPU count."""
        magic, version, vcpus = struct.unpack_from("<3I", self._ram, gp.PARAMS_MAGIC)
        return (magic, version, vcpus) == (gp.MAGIC, gp.VERSION, self.layout.vcpus)

    def counters(self) -> npt.NDArray[np.uint64]:
        """Every vCPU's loop counter (a copy)."""
        return self._areas["counter"].astype(np.uint64)

    def ticks(self) -> npt.NDArray[np.uint32]:
        """How many timer interrupts each vCPU took (a copy)."""
        return self._areas["ticks"].astype(np.uint32)

    def failures(self) -> tuple[GuestFailure, ...]:
        """The vCPUs that wrote a failure code, in index order."""
        # Codes first: the guest writes the details before the code, and x86 keeps both
        # the guest's stores and these loads in order, so a code read has its details.
        codes = self._areas["fail_code"].astype(np.uint32)
        wheres = self._areas["fail_where"].astype(np.uint32)
        values = self._areas["fail_value"].astype(np.uint64)
        return tuple(GuestFailure(int(i), int(codes[i]), int(wheres[i]), int(values[i]))
                     for i in np.flatnonzero(codes))

    def checksums(self, settle_s: float = SETTLE_S) -> ChecksumCheck:
        """Recount every vCPU's checksum block; look again, for up to ``settle_s``, at those
        caught inside their seqlock."""
        deadline = time.monotonic() + settle_s
        pending = np.arange(self.layout.vcpus)
        bad: list[int] = []
        while True:
            # Four passes, each finished before the next starts: SEQ, the block and its
            # sum, SEQ again. Equal even SEQs around them mean no update overlapped.
            seq_before = self._areas["seq"][pending]
            words = self._areas["words"][pending]
            sums = self._areas["sum"][pending]
            seq_after = self._areas["seq"][pending]
            settled = (seq_before == seq_after) & (seq_before % 2 == 0)
            totals = words.sum(axis=1, dtype=np.uint64) & 0xFFFF_FFFF
            bad += pending[settled & (totals != sums)].tolist()
            pending = pending[~settled]
            if not len(pending) or time.monotonic() >= deadline:
                return ChecksumCheck(tuple(sorted(bad)), tuple(pending.tolist()))
            time.sleep(_SETTLE_POLL_S)


@dataclass(frozen=True, slots=True)
class Continuity:
    """Whether a guest went on from where it stopped: ``vcpus_running`` advanced their
    counters; ``continued`` if all did, none wrote a failure code and every checksum holds;
    ``why`` names the first few problems."""

    vcpus: int
    vcpus_running: int
    continued: bool
    why: str = ""
    # False when each problem is one a later look may clear (a counter that has not moved
    # yet, a checksum block mid-update), none that it cannot (a failure code, a counter
    # gone back, a checksum that does not hold).
    final: bool = True


def continuity(before: npt.NDArray[np.uint64], after: GuestView, *,
               settle_s: float = SETTLE_S) -> Continuity:
    """Judge a resumed guest: ``before`` is its counters at the stop (from
    :meth:`GuestView.counters`), ``after`` its RAM once it has run for a while."""
    vcpus = after.layout.vcpus
    if before.shape != (vcpus,):
        raise DeviceError("guest", f"continuity: {before.size} counters before the stop, "
                                   f"the guest has {vcpus} vCPUs")
    if not after.installed:
        return Continuity(vcpus, 0, False, "the guest RAM holds no installed guest program "
                                           f"for {vcpus} vCPUs")
    counters = after.counters()
    problems = [failure.describe() for failure in after.failures()]
    problems += [f"cpu/{i} counter went back from {before[i]} to {counters[i]}"
                 for i in np.flatnonzero(counters < before)]
    stayed = [f"cpu/{i} counter stayed at {counters[i]}"
              for i in np.flatnonzero(counters == before)]
    checksums = after.checksums(settle_s)
    bad = [f"cpu/{i} checksum does not hold" for i in checksums.bad]
    unsettled = [f"cpu/{i} checksum unverified (mid-update at every look)"
                 for i in checksums.unsettled]
    final = bool(problems or bad) or not (stayed or unsettled)
    problems += stayed + bad + unsettled
    why = "; ".join(problems[:WHY_PROBLEMS])
    if len(problems) > WHY_PROBLEMS:
        why += f"; and {len(problems) - WHY_PROBLEMS} more"
    return Continuity(vcpus, int(np.count_nonzero(counters > before)), not problems, why,
                      final)
