"""The dirty log of a live guest's RAM: KVM's log of a running guest, fetched by the VM's
owner into the RAM's shared log, and taken from there by the RAM ranges, page for page."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from devstate.devices.kvm import guest
from devstate.devices.kvm.dirty import DirtyLog, forget_sent, mark_sent, per_range, take
from devstate.devices.kvm.live import LiveGuest
from devstate.devices.kvm.ram import PAGE_BYTES, GuestRam
from devstate.devices.kvm.vm import KvmVm
from tests.kvm_access import needs_kvm

MIB = 1 << 20


def test_take_gives_a_ranges_pages_and_clears_only_them() -> None:
    """Bits set straight into the shared log (KVM's layout: page k is bit k % 64 of word
    k // 64) come back as the pages of the range that holds them, once."""
    with GuestRam.create(64 * MIB, "take") as ram:
        pages = [0, 1, 63, 64, 8191, 8192, 8200, 16383]
        for page in pages:
            ram.dirty[page // 64] |= np.uint64(1 << (page % 64))
        first = take(ram, 0, 32 * MIB)
        assert list(np.flatnonzero(first)) == [0, 1, 63, 64, 8191]
        assert int(np.bitwise_count(ram.dirty).sum()) == 3  # the second range's are left
        second = take(ram, 32 * MIB, 32 * MIB)
        assert list(np.flatnonzero(second)) == [0, 8, 8191]
        assert not ram.dirty.any() and not take(ram, 0, 32 * MIB).any()


def test_each_range_counts_its_dirty_pages_and_those_never_sent() -> None:
    """Bits set straight into both shared logs: a range's dirty pages count as never sent
    until the range marks them sent, and a new migration forgets what it sent."""
    with GuestRam.create(64 * MIB, "sent") as ram:
        for page in (0, 1, 2, 8191, 8192, 9000):
            ram.dirty[page // 64] |= np.uint64(1 << (page % 64))
        assert per_range(ram) == ((4, 4), (2, 2))
        sent = np.zeros(8192, dtype=bool)
        sent[[1, 2, 3]] = True  # page 3 sent but clean: not counted at all
        mark_sent(ram, 0, sent)
        sent[:] = False
        sent[9000 - 8192] = True
        mark_sent(ram, 32 * MIB, sent)
        assert per_range(ram) == ((4, 2), (2, 1))
        forget_sent(ram, 0, 32 * MIB)
        assert per_range(ram) == ((4, 4), (2, 1))  # the second range's marks stay
        assert int(np.bitwise_count(ram.dirty).sum()) == 6  # the dirty log untouched


@pytest.fixture
def running_guest() -> Iterator[tuple[GuestRam, LiveGuest, KvmVm, guest.GuestLayout]]:
    """8 vCPUs of the guest program in 64 MiB, each dirtying 16 pages of a 64-page
    working set per tick, running."""
    with GuestRam.create(64 * MIB, "dirty-guest") as ram:
        layout = guest.GuestLayout.of(8, ram.size)
        guest.install(ram.view, layout, guest.GuestParams(dirty_pages_per_tick=16,
                                                          working_set_pages=64))
        vm = KvmVm(name="dirty-test")
        try:
            vm.map_ram(ram)
            for i in range(8):
                vm.create_vcpu(i)
            live = LiveGuest(vm, ram)
            live.start(paused=False)
            try:
                yield ram, live, vm, layout
            finally:
                live.close()
        finally:
            vm.close()


@needs_kvm
def test_rounds_of_dirty_pages_rebuild_the_ram_of_a_running_guest(running_guest) -> None:
    """What a migration does, in one process: copy every page once, then, round after
    round, the pages the log says the guest wrote; after the stop and a last round the
    copy equals the RAM, page for page. A log that missed a write leaves a page behind."""
    ram, live, vm, layout = running_guest
    log = DirtyLog(vm, ram)
    log.start()
    copy = np.array(np.frombuffer(ram.view, np.uint8))  # round 1: every page
    for start in range(0, ram.size, 32 * MIB):
        mark_sent(ram, start, np.ones(32 * MIB // PAGE_BYTES, dtype=bool))
    pages = copy.reshape(-1, PAGE_BYTES)
    seen = []

    def one_round() -> int:
        counts = log.sync()
        dirty = np.flatnonzero(take(ram, 0, ram.size))
        assert sum(n for n, _ in counts) == len(dirty)
        assert sum(n for _, n in counts) == 0  # every page was sent in round 1
        source = np.frombuffer(ram.view, np.uint8).reshape(-1, PAGE_BYTES)
        pages[dirty] = source[dirty]
        return len(dirty)

    for _ in range(4):
        time.sleep(0.1)
        seen.append(one_round())
    live.stop()
    seen.append(one_round())
    log.stop()
    differ = np.flatnonzero((pages != np.frombuffer(ram.view, np.uint8).reshape(
        -1, PAGE_BYTES)).any(axis=1))
    assert not differ.size, f"pages the log missed: {differ[:10]}"
    # The guest wrote its working sets (and its control blocks) every round.
    working = {p for i in range(8) for p in range(layout.working_set(i) // PAGE_BYTES,
                                                   layout.working_set(i) // PAGE_BYTES + 64)}
    assert min(seen[:4]) >= len(working) // 2, seen


@needs_kvm
def test_the_log_stops_and_starts_empty(running_guest) -> None:
    ram, live, vm, _ = running_guest
    log = DirtyLog(vm, ram)
    log.start()
    time.sleep(0.1)
    assert sum(n for n, _ in log.sync()) > 0
    ram.dirty[:] = np.uint64(0xFFFF)  # stale bits from a migration that ended
    log.stop()
    log.start()
    live.stop()
    assert sum(n for n, _ in log.sync()) < 8 * 64  # written since the start, no stale bits
