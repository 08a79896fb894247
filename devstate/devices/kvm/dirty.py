"""The guest's dirty pages during a live migration: KVM's dirty log, fetched by the VM's
owner into the RAM's shared log, and taken from there by each RAM range.

Runs in: the VM's owner (:class:`DirtyLog`: only it may issue the VM's ioctls) and the
workers that own RAM ranges (:func:`take`). They share the log in the RAM's memfd
(:attr:`~devstate.devices.kvm.ram.GuestRam.dirty`), never at the same time: the source
coordinator asks the owner to sync only after every range has answered for its round, and
the ranges take only when the coordinator asks them what is left or the save begins
(:mod:`devstate.migration.dirty`).

KVM_GET_DIRTY_LOG, not the dirty ring: the ring must be enabled before any vCPU exists and
is harvested per vCPU (a ring each to walk, then KVM_RESET_DIRTY_RINGS), where the log is
one ioctl per memory slot, a bit per page, fetched and cleared at once. This host's KVM
offers both (KVM_CAP_DIRTY_LOG_RING answers 1 MiB rings); the ring was not measured
against the log (the issue-20 note says so).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from devstate.config.spec import RAM_RANGE_BYTES
from devstate.devices.kvm.ram import PAGE_BYTES, GuestRam
from devstate.devices.kvm.vm import KvmVm

# A RAM range's pages in words of the log: ranges start on whole words (32 MiB = 128 words).
_RANGE_WORDS = RAM_RANGE_BYTES // PAGE_BYTES // 64


class DirtyLog:
    """The owner's side: KVM's dirty log of ``vm``'s RAM slots, ORed into ``ram.dirty``."""

    def __init__(self, vm: KvmVm, ram: GuestRam) -> None:
        self._vm = vm
        self._ram = ram
        self.on = False
        self._scratch = np.zeros_like(ram.dirty)

    def start(self) -> None:
        """Log from now on; the shared log starts empty (the first round sends every page)."""
        self._ram.dirty[:] = 0
        self._vm.log_dirty(True)
        self.on = True

    def stop(self) -> None:
        """Stop logging (the guest writes at full speed again). Idempotent."""
        if self.on:
            self.on = False
            self._vm.log_dirty(False)

    def sync(self) -> tuple[tuple[int, int], ...]:
        """Fetch and clear KVM's log of every slot into the shared log; return, for each RAM
        range, how many pages the shared log now holds (dirty and not yet taken) and how
        many of those were never sent (:func:`per_range`)."""
        for slot in self._vm.ram_slots:
            first = slot.offset // PAGE_BYTES // 64
            words = self._scratch[first:first + -(-slot.size // PAGE_BYTES // 64)]
            self._vm.dirty_log(slot, words)
            self._ram.dirty[first:first + words.size] |= words
        return per_range(self._ram)


def per_range(ram: GuestRam) -> tuple[tuple[int, int], ...]:
    """For each RAM range: the pages the shared log holds, and of those the ones never
    sent to the destination (holes there: the write that fills them faults them in)."""
    ranges = -(-ram.size // RAM_RANGE_BYTES)

    def by_range(words: npt.NDArray[np.uint64]) -> list[int]:
        counts = np.bitwise_count(words)
        pad = ranges * _RANGE_WORDS - counts.size
        padded = np.pad(counts, (0, max(0, pad)))[:ranges * _RANGE_WORDS]
        return [int(n) for n in padded.reshape(ranges, _RANGE_WORDS).sum(axis=1)]

    return tuple(zip(by_range(ram.dirty), by_range(ram.dirty & ~ram.sent), strict=True))


def mark_sent(ram: GuestRam, start: int, sent: npt.NDArray[np.bool_]) -> None:
    """Add ``sent`` (a bool per page of the range at RAM byte ``start``: whose bytes
    crossed) to the shared log of pages sent."""
    words = _range_words(ram.sent, start, sent.size * PAGE_BYTES)
    bits = np.packbits(sent, bitorder="little")
    words |= np.pad(bits, (0, words.size * 8 - bits.size)).view(np.uint64)


def forget_sent(ram: GuestRam, start: int, length: int) -> None:
    """A new migration of the range at ``start``: its destination holds none of its pages."""
    _range_words(ram.sent, start, length)[:] = 0


def take(ram: GuestRam, start: int, length: int) -> npt.NDArray[np.bool_]:
    """The pages of RAM bytes ``[start, start + length)`` the shared log holds, a bool per
    page, cleared from the log (they are the caller's to send now)."""
    words = _range_words(ram.dirty, start, length)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:length // PAGE_BYTES]
    words[:] = 0
    return bits.astype(bool)


def _range_words(log: npt.NDArray[np.uint64], start: int,
                 length: int) -> npt.NDArray[np.uint64]:
    """The words of ``log`` (the dirty or the sent log) that hold the pages of RAM bytes
    ``[start, start + length)``, as a view."""
    first, pages = start // PAGE_BYTES, length // PAGE_BYTES
    # A range owns whole words of the logs (ranges are 32 MiB): clearing a shared word
    # would lose a neighbour's pages.
    assert first % 64 == 0, f"a range at page {first} shares a word of the logs"
    return log[first // 64:-(-(first + pages) // 64)]
