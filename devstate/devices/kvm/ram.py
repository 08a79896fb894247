"""Guest RAM: one memfd, mapped shared, that KVM runs the guest on and every worker reads
and writes in place.

Runs in: any process. The coordinator *creates* the RAM (:meth:`GuestRam.create`) and passes
its fd to every worker, which *attaches* (:meth:`GuestRam.attach`); the VM's owner also gives
the mapping to KVM (:meth:`~devstate.devices.kvm.vm.KvmVm.map_ram`). All mappings are of the
same pages (``MAP_SHARED``), so what a vCPU writes a worker reads at once, and the reverse.

A memfd rather than a ``/dev/shm`` file: it has no name anyone can open or leak, it goes
away with its last fd or mapping, and it passes between processes as an fd (SCM_RIGHTS).

The RAM is *not* pre-faulted, unlike the arena (ARCHITECTURE.md section 5, rule 6): a page
nobody wrote stays a hole of the memfd, costs no memory, reads as zero, and a migration
neither reads nor sends it (:func:`data_pages` finds the holes without touching them; a
run of zero pages crosses as a header, and the destination leaves it a hole). So each side
holds the RAM the guest used, not the RAM it was given, as a VMM without preallocation
does. The first touch of a page is paid where it happens: by the guest on the source, by
round 1 of the precopy on the destination; in the stop only by a page the guest wrote for
the first time in the last round. The dirty log after the RAM is pre-faulted: every sync
writes it.

After the RAM the memfd holds its *dirty log*, a bit per page (:attr:`GuestRam.dirty`): the
pages the guest wrote that no RAM range has taken yet. The VM's owner ORs in what each
KVM_GET_DIRTY_LOG returns; each range's owner takes (and clears) its own part. Shared
memory, so a round's bitmap reaches every worker without a copy through the pool's pipes;
the two never touch it at once (the coordinator orders them: :mod:`devstate.migration.dirty`).

After the dirty log, in the same layout, the pages *sent* (:attr:`GuestRam.sent`): those whose
bytes crossed to this migration's destination, set by the ranges that sent them. Any other
page is a hole there, and the first write into a hole faults it in: ~2.4 us a page on this
project's host against ~0.2 us to copy a warm one, 11.8 ms against 1.0 for 19 MiB. So the
owner's sync counts, beside each range's dirty pages, those not sent yet: what the stop
would write into holes (the estimate's part, :mod:`devstate.planning.cost`).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from types import TracebackType

import numpy as np
import numpy.typing as npt

from devstate.errors import DeviceError, SpecError

PAGE_BYTES = mmap.PAGESIZE
# madvise(MADV_POPULATE_WRITE) (Linux 5.14) faults every page in, writable, in one call, and
# never changes their contents; Python 3.11 does not name the constant.
_MADV_POPULATE_WRITE = 23
_DEVICE = "guest-ram"


class GuestRam:
    """A guest's RAM: a memfd of ``size`` bytes and this process's shared mapping of it.

    A context manager; :meth:`close` is idempotent. Who may write it: the guest (its vCPUs),
    the program installer before the first vCPU runs, and the RAM ranges' owners while
    the guest is stopped; everyone else only reads.
    """

    def __init__(self, fd: int, size: int, mapping: mmap.mmap) -> None:
        """Take ownership of ``fd`` and ``mapping``; use :meth:`create` or :meth:`attach`."""
        self._fd = fd
        self._size = size
        self._mmap: mmap.mmap | None = mapping
        whole = memoryview(mapping)
        self._view: memoryview | None = whole[:size]
        words = -(-size // PAGE_BYTES // 64)
        self._dirty: npt.NDArray[np.uint64] | None = np.frombuffer(
            whole[size:size + words * 8], np.uint64)
        self._sent: npt.NDArray[np.uint64] | None = np.frombuffer(
            whole[size + words * 8:size + 2 * words * 8], np.uint64)
        whole.release()
        # The mapping never moves, so its address outlives the ctypes object that exposed
        # it (a temporary buffer export, released at once: exports would block close()).
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))

    @classmethod
    def create(cls, size: int, name: str) -> GuestRam:
        """New zeroed RAM of ``size`` bytes (a multiple of the page), mapped (a hole until
        written).

        ``name`` shows in ``/proc/<pid>/fd`` (``memfd:<name>``), for whoever debugs.
        """
        _check_size(size)
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        except OSError as exc:
            raise DeviceError(_DEVICE, f"memfd_create({name!r}): {exc.strerror}",
                              exc.errno) from exc
        return cls._owning(fd, size, f"size and map memfd {name!r} ({size} B)",
                           lambda: os.ftruncate(fd, size + log_bytes(size)))

    @classmethod
    def attach(cls, fd: int, size: int) -> GuestRam:
        """Map RAM another process created (``fd`` stays the caller's: it is dup'ed here).

        ``size`` must be the memfd's size: a mismatch means the two sides disagree on the
        machine, and mapping past the file's end would fault (SIGBUS) on first touch.
        """
        _check_size(size)
        try:
            actual = os.fstat(fd).st_size
        except OSError as exc:
            raise DeviceError(_DEVICE, f"attach fd {fd}: {exc.strerror}", exc.errno) from exc
        if actual != size + log_bytes(size):
            raise DeviceError(_DEVICE, f"attach fd {fd}: the memfd holds {actual} B, "
                                       f"expected {size} B and its logs")
        return cls._owning(os.dup(fd), size, f"map fd {fd} ({size} B)")

    @classmethod
    def _owning(cls, fd: int, size: int, what: str,
                prepare: Callable[[], None] | None = None) -> GuestRam:
        """RAM over ``fd`` (ours now: closed if anything fails), ``prepare``d, then mapped."""
        try:
            if prepare is not None:
                prepare()
            return cls(fd, size, _map(fd, size))
        except OSError as exc:
            os.close(fd)
            raise DeviceError(_DEVICE, f"{what}: {exc.strerror}", exc.errno) from exc
        except BaseException:
            os.close(fd)
            raise

    @property
    def fd(self) -> int:
        """The memfd, to pass to another process (-1 once closed)."""
        return self._fd

    @property
    def size(self) -> int:
        """Bytes of RAM."""
        return self._size

    @property
    def view(self) -> memoryview:
        """A writable view of all of the RAM; DeviceError once closed."""
        if self._view is None:
            raise DeviceError(_DEVICE, "the RAM was closed")
        return self._view

    @property
    def dirty(self) -> npt.NDArray[np.uint64]:
        """The shared dirty log: page k of the RAM is bit k % 64 of word k // 64 (KVM's
        layout); DeviceError once closed."""
        if self._dirty is None:
            raise DeviceError(_DEVICE, "the RAM was closed")
        return self._dirty

    @property
    def sent(self) -> npt.NDArray[np.uint64]:
        """The pages whose bytes crossed to this migration's destination, in the dirty
        log's layout (the module's docstring); DeviceError once closed."""
        if self._sent is None:
            raise DeviceError(_DEVICE, "the RAM was closed")
        return self._sent

    @property
    def address(self) -> int:
        """The mapping's address in this process (for KVM_SET_USER_MEMORY_REGION)."""
        if self._view is None:
            raise DeviceError(_DEVICE, "the RAM was closed")
        return self._address

    def close(self) -> None:
        """Release the view, unmap and close the fd. Idempotent.

        Close a VM that maps this RAM first: KVM keeps the address, not the pages. A view
        derived from :attr:`view` (a slice, a numpy array) that is still alive keeps the
        pages mapped until it goes (``mmap.close`` refuses while exports exist), so such a
        view never reads unmapped memory; the fd is closed either way.
        """
        view, self._view = self._view, None
        self._dirty = self._sent = None
        mapping, self._mmap = self._mmap, None
        fd, self._fd = self._fd, -1
        if view is not None:
            view.release()
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a derived view still holds it: unmapped when the last one goes
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GuestRam(fd={self._fd}, size={self._size})"


def log_bytes(size: int) -> int:
    """Bytes of the logs after ``size`` bytes of RAM (dirty, then sent): a bit per page in
    64-bit words each, rounded up to whole pages."""
    words = -(-size // PAGE_BYTES // 64)
    return -(-2 * words * 8 // PAGE_BYTES) * PAGE_BYTES


def _check_size(size: int) -> None:
    if size <= 0 or size % PAGE_BYTES:
        raise SpecError("ram.size", f"{size} B is not a positive multiple of the "
                                    f"{PAGE_BYTES} B page")


def _map(fd: int, size: int) -> mmap.mmap:
    """A shared, writable mapping of ``fd``'s RAM of ``size`` bytes and its logs, the
    logs' pages faulted in (the RAM's stay as they are: see the module's docstring)."""
    log = log_bytes(size)
    mapping = mmap.mmap(fd, size + log, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        mapping.madvise(_MADV_POPULATE_WRITE, size, log)
    except OSError:
        # Before Linux 5.14: read one byte per page. A read fault on a memfd allocates the
        # page and maps it writable (shmem tracks no dirty pages), and unlike a write it
        # cannot clobber what another process stores meanwhile.
        for pos in range(size, size + log, PAGE_BYTES):
            mapping[pos]
    return mapping


def data_pages(ram: GuestRam, start: int, length: int) -> npt.NDArray[np.bool_]:
    """A bool per page of RAM bytes ``[start, start + length)``: whether it holds data
    (False: a hole of the memfd, zero, which nobody wrote). Asks the memfd (SEEK_DATA,
    SEEK_HOLE): no page is read, so no hole is faulted in."""
    pages = np.zeros(length // PAGE_BYTES, dtype=bool)
    end, pos = start + length, start
    while pos < end:
        try:
            data = os.lseek(ram.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise DeviceError(_DEVICE, f"SEEK_DATA at {pos}: {exc.strerror}",
                              exc.errno) from exc
        if data >= end:
            break
        hole = min(end, os.lseek(ram.fd, data, os.SEEK_HOLE))
        pages[(data - start) // PAGE_BYTES:-(-(hole - start) // PAGE_BYTES)] = True
        pos = hole
    return pages
