"""The one small interface every device backend implements.

Runs in: the worker process that owns the device (the owner rule), on that worker's event
loop. Nothing here is shared between processes: a device object and the handles it holds
(a vCPU's state, a device model's control and data fds) live and die in their owner.

Two shapes, as in ARCHITECTURE.md: a *record* device produces and consumes its state whole,
synchronously (a vCPU's register file: a few KB, a few tens of microseconds of CPU); a
*stream* device yields an opaque, ordered byte stream of unknown length through an async
session (VFIO's data fd), so a worker can drive many of them at once.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from devstate.config.spec import DeviceSpec, Shape

# xxh3_128 digests are 16 bytes.
DIGEST_BYTES = 16


class Device(abc.ABC):
    """A device of the machine, held by its owner worker."""

    shape: Shape

    def __init__(self, spec: DeviceSpec, machine_seed: int) -> None:
        self.spec = spec
        self.machine_seed = machine_seed

    @property
    def id(self) -> str:
        """The device's stable id, e.g. ``cpu/17`` or ``vfio/nic0``."""
        return self.spec.id

    async def open(self) -> None:
        """Acquire what the device needs (spawn a device model, build state). Idempotent."""

    async def close(self) -> None:
        """Release everything :meth:`open` acquired. Idempotent and safe after a failed open."""

    @abc.abstractmethod
    async def digest(self) -> bytes:
        """xxh3_128 of the device's current state, byte for byte (16 bytes)."""

    async def stop(self) -> None:
        """Quiesce the device for stop-and-copy (the VM is stopped)."""

    async def resume(self) -> None:
        """Run the device again, from whatever state a save or load left it in."""


class RecordDevice(Device):
    """Small state produced and consumed whole."""

    shape = Shape.RECORD

    @property
    def batch(self) -> RecordBatch | None:
        """The batch this record gets and puts with, many to a call on the owner's threads
        (a KVM VM's vCPUs); None: one at a time, on the worker's loop."""
        return None

    @abc.abstractmethod
    def get(self, out: memoryview) -> int:
        """Write the whole state into ``out`` (at least ``spec.size`` bytes); return its length."""

    @abc.abstractmethod
    def put(self, data: memoryview) -> None:
        """Load a whole state produced by :meth:`get` on a compatible device; validate it."""


class StreamDevice(Device):
    """An opaque ordered byte stream, read in a save session and written in a load session."""

    shape = Shape.STREAM

    # Devices that can stream while the VM runs (VFIO PRE_COPY) say so and implement the
    # three precopy methods; save_begin then continues the same session.
    supports_precopy = False

    async def precopy_begin(self) -> None:
        """Open a save session while running (VFIO: -> PRE_COPY)."""
        raise NotImplementedError(f"{self.id} has no precopy")

    async def precopy_read(self, out: memoryview) -> int:
        """Read precopy bytes; ``OSError(ENOMSG)`` when none are there for now."""
        raise NotImplementedError(f"{self.id} has no precopy")

    async def precopy_remaining(self) -> int:
        """Bytes the device still has to produce while running (initial and dirty)."""
        raise NotImplementedError(f"{self.id} has no precopy")

    @abc.abstractmethod
    async def save_begin(self) -> None:
        """Enter stop-and-copy (VFIO: -> STOP_COPY) and open a new save session (after
        precopy: go on with the same one)."""

    @abc.abstractmethod
    async def save_read(self, out: memoryview) -> int:
        """Read the next bytes of the stream into ``out``; 0 means the whole state was read."""

    @abc.abstractmethod
    async def save_end(self) -> None:
        """Close the save session; the device stays stopped and keeps its state."""

    @abc.abstractmethod
    async def load_begin(self) -> None:
        """Open a new load session (VFIO: STOP -> RESUMING)."""

    @abc.abstractmethod
    async def load_write(self, data: memoryview) -> None:
        """Write the next bytes of the stream, in order; any segmentation is allowed."""

    @abc.abstractmethod
    async def load_end(self) -> None:
        """Finish the load (VFIO: RESUMING -> STOP): the device validates and digests it.

        This is where firmware load latency is paid. Raises :class:`DeviceError` if the
        stream was incomplete or inconsistent.
        """

    @abc.abstractmethod
    async def reset(self) -> None:
        """Discard whatever a failed or cancelled session left and return to running."""


class RecordBatch(abc.ABC):
    """Records of one owner whose gets and puts run many to a call, off the event loop,
    each call on one of the owner's threads with the GIL released (a KVM VM's vCPUs).

    Runs in: the owner worker, on any of its threads; calls on different threads take
    disjoint devices.
    """

    @abc.abstractmethod
    def get_many(self, devices: Sequence[RecordDevice], outs: Sequence[memoryview]) -> int:
        """Get each device into its ``outs`` entry; return the length of every record."""

    @abc.abstractmethod
    def put_many(self, devices: Sequence[RecordDevice], records: Sequence[memoryview], *,
                 readback: bool = True) -> None:
        """Put each record into its device; with ``readback``, read the device back and
        verify it against the record (DeviceError naming the device)."""

    @abc.abstractmethod
    def threads(self, cpus: int, wanted: int | None) -> int:
        """How many threads to split a batch over, of ``cpus`` usable, ``wanted`` if given."""
