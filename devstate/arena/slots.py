"""The shared-memory arena: one pre-faulted segment per side, cut into slots.

Ownership:

* The coordinator *creates* the arena (``Arena.create``) and pre-faults it before the VM
  stops: first touch of shared memory runs ~50x slower than a warm copy.
* Each worker *attaches* (``Arena.attach``) at start, pre-faults its own page tables for
  its partition, and cuts that partition into slots (:class:`SlotPool`). A worker only ever
  writes its own partition, so slots need no cross-process locking.
* Once every worker has attached, the coordinator unlinks the name: the memory lives on in
  the mappings and is freed by the kernel when the last process unmaps it, so no exit path
  (not even SIGKILL of the coordinator) can leave a segment in /dev/shm.

Views: every slot's :class:`memoryview` is made once, by the arena, and tracked. ``close()``
releases them before unmapping, and unmapping refuses (``ArenaError``) while any other
view is alive, so a closed arena can never leave a dangling pointer: touching a released
view raises ``ValueError`` instead of segfaulting. (``np.ndarray(buffer=...)`` would bypass
this and is never used: see shared/reference/python-runtime-notes.md, A1.)
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import uuid
from collections import deque
from dataclasses import dataclass

from devstate.errors import ArenaError

SHM_DIR = "/dev/shm"
PREFIX = "devstate-"
PAGE = mmap.PAGESIZE
# madvise(MADV_POPULATE_WRITE) (Linux 5.14) faults every page in with one call; Python 3.11
# does not name the constant.
_MADV_POPULATE_WRITE = 23


@dataclass(frozen=True, slots=True)
class SlotClass:
    """One size class of a worker's slots: ``count`` slots of ``size`` bytes."""

    size: int
    count: int

    @property
    def bytes(self) -> int:
        """Bytes this class takes in a partition (slots are page aligned)."""
        return _round_up(self.size, PAGE) * self.count


@dataclass(frozen=True, slots=True)
class Layout:
    """How an arena is cut: one partition per worker, each with the same slot classes."""

    workers: int
    classes: tuple[SlotClass, ...]

    @property
    def partition_bytes(self) -> int:
        """Size of one worker's partition."""
        return sum(c.bytes for c in self.classes)

    @property
    def total_bytes(self) -> int:
        """Size of the whole arena."""
        return self.partition_bytes * self.workers


class Slot:
    """A slot of the arena: its place and a view of exactly its bytes.

    Runs in: the worker owning the partition. ``view`` is writable by that worker alone
    until the slot is released back to its pool.
    """

    __slots__ = ("klass", "offset", "size", "view")

    def __init__(self, klass: int, offset: int, size: int, view: memoryview) -> None:
        self.klass = klass
        self.offset = offset
        self.size = size
        self.view = view


class Arena:
    """A named POSIX shared-memory segment, mapped once in this process."""

    def __init__(self, name: str, size: int, mm: mmap.mmap, *, owner: bool) -> None:
        self.name = name
        self.size = size
        self.is_owner = owner
        self._mm: mmap.mmap | None = mm
        self._views: list[memoryview] = []
        self._linked = owner

    @classmethod
    def create(cls, size: int) -> Arena:
        """Create, map and pre-fault a new arena of ``size`` bytes (coordinator)."""
        if size <= 0:
            raise ArenaError(f"arena size must be > 0, got {size}")
        size = _round_up(size, PAGE)
        free = _shm_free_bytes()
        if size > free:
            raise ArenaError(f"arena of {size >> 20} MiB does not fit: {SHM_DIR} has "
                             f"{free >> 20} MiB free (raise the tmpfs size or lower the "
                             "arena's slot counts)")
        name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            raise ArenaError(f"cannot create arena {path}: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except OSError as exc:
            os.unlink(path)
            raise ArenaError(f"cannot size or map arena {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        arena = cls(name, size, mm, owner=True)
        arena.prefault(0, size)
        return arena

    @classmethod
    def attach(cls, name: str, size: int) -> Arena:
        """Map an existing arena by name (worker)."""
        if not name.startswith(PREFIX) or "/" in name:
            raise ArenaError(f"{name!r} is not a devstate arena name")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise ArenaError(f"cannot attach arena {path}: {exc.strerror}") from exc
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ArenaError(f"arena {name} is {actual} bytes, expected {size}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=False)

    def prefault(self, offset: int, length: int) -> None:
        """Fault in this process's page tables for a range, before the VM stops."""
        mm = self._mapped()
        try:
            mm.madvise(_MADV_POPULATE_WRITE, offset, length)
        except OSError:
            # Older kernels: write one byte per page (the pages are ours, still unused).
            for pos in range(offset, offset + length, PAGE):
                mm[pos] = 0

    def view(self, offset: int, length: int) -> memoryview:
        """A tracked writable view of ``[offset, offset + length)``, released by close()."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ArenaError(f"range {offset}+{length} is outside the arena of {self.size}")
        view = memoryview(self._mapped())[offset:offset + length]
        self._views.append(view)
        return view

    def slot_pool(self, layout: Layout, worker: int) -> SlotPool:
        """Cut worker ``worker``'s partition into slots (its views are tracked here)."""
        if not 0 <= worker < layout.workers:
            raise ArenaError(f"worker {worker} has no partition in a {layout.workers}-way arena")
        if layout.total_bytes > self.size:
            raise ArenaError(f"layout needs {layout.total_bytes} bytes, arena has {self.size}")
        base = worker * layout.partition_bytes
        self.prefault(base, layout.partition_bytes)
        classes: list[list[Slot]] = []
        pos = base
        for k, klass in enumerate(layout.classes):
            stride = _round_up(klass.size, PAGE)
            classes.append([Slot(k, pos + i * stride, klass.size,
                                 self.view(pos + i * stride, klass.size))
                            for i in range(klass.count)])
            pos += klass.bytes
        return SlotPool(classes)

    def unlink(self) -> None:
        """Remove the name (owner only, idempotent); mappings stay valid until closed."""
        if self.is_owner and self._linked:
            self._linked = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))

    def close(self) -> None:
        """Release every view, unmap, and (owner) unlink. Idempotent."""
        try:
            if self._mm is not None:
                for view in self._views:
                    view.release()
                self._views.clear()
                mm, self._mm = self._mm, None
                try:
                    mm.close()
                except BufferError as exc:
                    raise ArenaError(f"arena {self.name} closed while views of it are "
                                     "still held outside the arena") from exc
        finally:
            self.unlink()

    def _mapped(self) -> mmap.mmap:
        if self._mm is None:
            raise ArenaError(f"arena {self.name} is closed")
        return self._mm

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlotPool:
    """A worker's slots, by size class, with backpressure: ``acquire`` waits when none is free.

    Runs in: one worker process, on its event loop (no locking needed).
    """

    def __init__(self, classes: list[list[Slot]]) -> None:
        self._all = [tuple(slots) for slots in classes]
        self._free: list[deque[Slot]] = [deque(slots) for slots in classes]
        self._waiters: list[deque[asyncio.Future[None]]] = [deque() for _ in classes]
        self.sizes = tuple(slots[0].size if slots else 0 for slots in classes)
        self.counts = tuple(len(slots) for slots in classes)

    def available(self, klass: int) -> int:
        """How many slots of a class are free now."""
        return len(self._free[klass])

    def acquire_nowait(self, klass: int) -> Slot | None:
        """A free slot of the class, or None."""
        free = self._free[klass]
        return free.popleft() if free else None

    async def acquire(self, klass: int) -> Slot:
        """A free slot of the class, waiting (backpressure) until one is released."""
        while True:
            slot = self.acquire_nowait(klass)
            if slot is not None:
                return slot
            fut = asyncio.get_running_loop().create_future()
            self._waiters[klass].append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters[klass]:
                    self._waiters[klass].remove(fut)

    def reclaim(self, klass: int) -> None:
        """Every slot of a class is free again (the caller knows none is in use)."""
        free = self._free[klass]
        free.clear()
        free.extend(self._all[klass])
        waiters = self._waiters[klass]
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def release(self, slot: Slot) -> None:
        """Give a slot back; wakes one waiter of its class."""
        self._free[slot.klass].append(slot)
        waiters = self._waiters[slot.klass]
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break


def sweep_stale_segments() -> list[str]:
    """Remove arenas whose creating process no longer exists; return their names.

    Names are ``devstate-<pid>-<id>``; a segment normally lives only until the pool has
    attached, so one left behind means its coordinator was killed during pool start.
    """
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shm_free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError as exc:
        raise ArenaError(f"{SHM_DIR} is not usable: {exc.strerror}") from exc
    return st.f_bavail * st.f_frsize


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align
