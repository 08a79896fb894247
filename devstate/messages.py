"""Messages between the coordinator and its workers: small picklable value types.

Bytes never travel in these; device state stays in the arena and on the channels. Each
request gets exactly one :class:`Reply` with the same ``req`` number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class OpenDevices:
    """Build and open the devices this worker owns; ``incoming`` devices start blank."""

    devices: tuple[int, ...]
    incoming: bool


@dataclass(frozen=True, slots=True)
class ConnectChannel:
    """Source: connect data channel ``hello`` to the destination at ``path`` and send it."""

    path: str
    hello: bytes


@dataclass(frozen=True, slots=True)
class AdoptChannel:
    """Destination: the data channel's fd follows this message (SCM_RIGHTS)."""

    index: int


@dataclass(frozen=True, slots=True)
class Save:
    """Source: stop, get and send these devices in this order.

    ``record_threads`` > 1 gets kvm vCPUs on that many threads (single-vm mode).
    """

    order: tuple[int, ...]
    concurrent: bool
    record_threads: int = 1


@dataclass(frozen=True, slots=True)
class PrepareLoad:
    """Destination, before the source stops: open a load session on each stream device."""

    devices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Load:
    """Destination: receive and put these devices, verifying each one's digest.

    ``record_threads`` > 1 puts kvm vCPUs on that many threads (single-vm mode).
    """

    devices: tuple[int, ...]
    concurrent: bool
    record_threads: int = 1


@dataclass(frozen=True, slots=True)
class Resume:
    """Run every owned device again (the VM resumes on this side)."""


@dataclass(frozen=True, slots=True)
class Discard:
    """Destination: drop what was loaded (the migration failed); devices back to blank."""


@dataclass(frozen=True, slots=True)
class Digests:
    """Report each owned device's state digest (tests and reports; off the critical path)."""

    devices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SnapshotRecords:
    """Get every owned record device into this worker's arena slots, with no channel.

    One side of a migration alone (the scaling benchmarks measure each side apart, since
    both sides share the cores of one host). Replies with the worker's get time in ns.
    """


@dataclass(frozen=True, slots=True)
class RestoreRecords:
    """Put every record of the last :class:`SnapshotRecords` back; reply with the ns taken."""


@dataclass(frozen=True, slots=True)
class Results:
    """Report the per-device results of the last Save or Load.

    Save and Load reply with a device count only: building, pickling and unpacking a
    result per device costs ~10 us each, so it happens after the VM resumed.
    """


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel the Save or Load in progress; its reply then reports the cancellation."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Close every device and channel and exit."""


@dataclass(frozen=True, slots=True)
class Request:
    """A numbered command to one worker."""

    req: int
    command: Any


@dataclass(frozen=True, slots=True)
class DeviceResult:
    """What one device's get or put did: bytes, timing (monotonic ns) and verification."""

    index: int
    id: str
    bytes: int
    packets: int
    start_ns: int
    end_ns: int
    worker: int
    verified: bool = False
    done_ns: int = 0  # destination: when the device finished loading (firmware included)


def pack_results(results: list[DeviceResult]) -> list[tuple[Any, ...]]:
    """Results as plain tuples: pickling 512 dataclasses costs ~2 ms each way, tuples 0.2."""
    return [(r.index, r.id, r.bytes, r.packets, r.start_ns, r.end_ns, r.worker, r.verified,
             r.done_ns) for r in results]


def unpack_results(replies: dict[int, list[tuple[Any, ...]]]) -> list[DeviceResult]:
    """Every worker's :class:`Results` reply, unpacked into one list."""
    return [DeviceResult(*row) for rows in replies.values() for row in rows]


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to :class:`Request` ``req``: a value, or an error's type and text."""

    req: int
    ok: bool
    value: Any = None
    error_type: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
