"""The arena: sizing, slots with backpressure, views that cannot dangle, no leaks."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from devstate.arena.slots import Arena, Layout, SlotClass, sweep_stale_segments
from devstate.errors import ArenaError
from tests.conftest import shm_segments


def test_create_attach_share_bytes_and_unlink() -> None:
    with Arena.create(1 << 20) as owner:
        assert owner.name in shm_segments()
        with Arena.attach(owner.name, owner.size) as other:
            view = other.view(4096, 8)
            view[:] = b"devstate"
            assert bytes(owner.view(4096, 8)) == b"devstate"
        owner.unlink()
        assert owner.name not in shm_segments()
        # Unlinked, the mapping still works: the kernel frees it with the last mapping.
        assert bytes(owner.view(4096, 8)) == b"devstate"
    assert owner.name not in shm_segments()


def test_segment_is_private_to_its_owner() -> None:
    with Arena.create(4096) as arena:
        mode = os.stat(f"/dev/shm/{arena.name}").st_mode & 0o777
        assert mode == 0o600


def test_bad_sizes_and_names() -> None:
    with pytest.raises(ArenaError, match="must be > 0"):
        Arena.create(0)
    with pytest.raises(ArenaError, match="does not fit"):
        Arena.create(1 << 50)
    with pytest.raises(ArenaError, match="not a devstate arena"):
        Arena.attach("../etc/passwd", 4096)
    with pytest.raises(ArenaError, match="cannot attach"):
        Arena.attach("devstate-0-missing", 4096)
    with Arena.create(8192) as arena, pytest.raises(ArenaError, match="expected 4096"):
        Arena.attach(arena.name, 4096)


def test_closed_arena_never_leaves_a_dangling_view() -> None:
    arena = Arena.create(1 << 16)
    tracked = arena.view(0, 16)
    arena.close()
    # The arena released its own views before unmapping: use raises, never segfaults.
    with pytest.raises(ValueError):
        tracked[0] = 1
    with pytest.raises(ArenaError, match="closed"):
        arena.view(0, 16)
    arena.close()  # idempotent


def test_close_refuses_while_a_foreign_view_is_held() -> None:
    arena = Arena.create(1 << 16)
    held = np.frombuffer(arena.view(0, 64), dtype=np.uint8)  # pins the mapping
    with pytest.raises(ArenaError, match="still held"):
        arena.close()
    assert arena.name not in shm_segments()  # the name goes on every path
    held[0] = 7  # still mapped: the refusal kept this pointer valid
    del held


def test_slot_pool_partitions_and_backpressure(run) -> None:
    layout = Layout(2, (SlotClass(8192, 2), SlotClass(1 << 20, 1)))
    with Arena.create(layout.total_bytes) as arena:
        pool0 = arena.slot_pool(layout, 0)
        pool1 = arena.slot_pool(layout, 1)
        a, b = pool0.acquire_nowait(0), pool0.acquire_nowait(0)
        assert a is not None and b is not None and pool0.acquire_nowait(0) is None
        mine = {a.offset, b.offset}
        theirs = {s.offset for s in (pool1.acquire_nowait(0), pool1.acquire_nowait(0)) if s}
        assert not mine & theirs
        assert all(o < layout.partition_bytes for o in mine)

        async def waiter() -> int:
            slot = await pool0.acquire(0)  # blocks: both slots are out
            return slot.offset

        async def scenario() -> int:
            task = asyncio.ensure_future(waiter())
            await asyncio.sleep(0)
            assert not task.done()
            pool0.release(a)
            return await task

        assert run(scenario()) == a.offset
        with pytest.raises(ArenaError, match="no partition"):
            arena.slot_pool(layout, 2)


def test_sweep_removes_only_dead_owners_segments() -> None:
    stale = "/dev/shm/devstate-999999999-deadbeef"
    with open(stale, "wb"):
        pass
    with Arena.create(4096) as live:
        removed = sweep_stale_segments()
        assert "devstate-999999999-deadbeef" in removed
        assert live.name in shm_segments()


def test_reclaim_frees_every_slot_of_a_class_and_wakes_waiters() -> None:
    """What a cancelled run left held comes back whole for the next run."""
    layout = Layout(1, (SlotClass(4096, 3), SlotClass(4096, 1)))
    with Arena.create(layout.total_bytes) as arena:
        pool = arena.slot_pool(layout, 0)

        async def scenario() -> int:
            held = [pool.acquire_nowait(0) for _ in range(3)]
            assert pool.available(0) == 0 and all(held)
            waiting = asyncio.ensure_future(pool.acquire(0))
            await asyncio.sleep(0)
            pool.reclaim(0)
            await asyncio.wait_for(waiting, 1)  # a waiter is woken, and gets a slot
            return pool.available(0)

        assert asyncio.run(scenario()) == 2
        assert pool.available(1) == 1  # other classes are untouched
