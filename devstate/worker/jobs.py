"""Messages between the coordinator and its workers: small picklable value types.

Bytes never travel in these; device state stays in the arena and on the channels. Each
request gets exactly one :class:`Reply` with the same ``req`` number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devstate.report.migration import DeviceResult


@dataclass(frozen=True, slots=True)
class OpenDevices:
    """Build and open the devices this worker owns; ``incoming`` devices start blank."""

    devices: tuple[int, ...]
    incoming: bool


@dataclass(frozen=True, slots=True)
class ArmFault:
    """Arm ``fault`` (``POINT:FAULT[:SKIP]``, :mod:`devstate.worker.faults`) in this worker; None
    disarms. Tests only."""

    fault: str | None


@dataclass(frozen=True, slots=True)
class ConnectChannels:
    """Source: connect these data channels to the destination at ``address``.

    ``hellos`` pairs each channel index with the hello it opens with; ``tls`` (a
    :class:`~devstate.net.transport.TlsConfig`, or None) secures them.
    """

    address: Any
    hellos: tuple[tuple[int, bytes], ...]
    tls: Any = None


@dataclass(frozen=True, slots=True)
class AdoptChannel:
    """Destination: data channel ``index``'s fd follows this message (SCM_RIGHTS).

    With ``tls`` the worker runs the TLS handshake itself, then reads the channel's hello
    again inside TLS, where it must equal ``hello`` (the plaintext one that routed it here).
    """

    index: int
    hello: bytes = b""
    tls: Any = None


@dataclass(frozen=True, slots=True)
class JoinMesh:
    """This worker's end of its link to worker ``peer`` follows (SCM_RIGHTS)."""

    peer: int


@dataclass(frozen=True, slots=True)
class Save:
    """Source: get and send these devices in this order, on the channels ``routes`` gives
    (operation number ``gen`` tags the handoffs between workers). With ``precopy``,
    devices that support it stream while the VM runs, the rest wait for SwitchOver.

    ``record_threads`` > 1 gets kvm vCPUs on that many threads (single-vm mode).
    """

    order: tuple[int, ...]
    concurrent: bool
    routes: Any
    gen: int
    record_threads: int = 1
    bandwidth_limit: float | None = None  # bytes/s over all channels, None: unlimited
    precopy: bool = False  # stream precopy devices while running, until SwitchOver
    transfer: Any = None  # admission.TransferOrder for stop-and-copy; None: all at once


@dataclass(frozen=True, slots=True)
class SwitchOver:
    """Source, during a precopy Save: the VM stops now; save everything that is left."""


@dataclass(frozen=True, slots=True)
class PrecopyRemaining:
    """Source, during a precopy Save: bytes each precopy device still has to produce."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Source: the Save in progress so far, as (devices done, state bytes read)."""


@dataclass(frozen=True, slots=True)
class PrepareLoad:
    """Destination, before the source stops: open a load session on each stream device."""

    devices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Load:
    """Destination: receive and put these devices, verifying each one's digest.

    ``owner`` maps every device of the table to its destination worker: packets of devices
    owned elsewhere are handed over (operation number ``gen``). ``record_threads`` > 1 puts
    kvm vCPUs on that many threads (single-vm mode).
    """

    devices: tuple[int, ...]
    concurrent: bool
    owner: tuple[int, ...]
    gen: int
    record_threads: int = 1


@dataclass(frozen=True, slots=True)
class Pause:
    """Stop every owned device (the VM pauses on this side, outside any migration)."""


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
    """Get owned record devices (the first ``count``, or all) into this worker's arena
    slots, with no channel.

    One side of a migration alone (the scaling benchmarks measure each side apart, since
    both sides share the cores of one host; the cost model probes a sample). Replies with
    the worker's get time in ns and how many records it got.
    """

    count: int | None = None


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


# Workers record results as plain tuples in DeviceResult's field order
# (:class:`devstate.report.migration.DeviceResult`): on the critical
# path a tuple costs ~0.3 us where a frozen dataclass costs ~2, and 512 of them pickle in
# 0.2 ms instead of 2. Only the coordinator makes DeviceResults, after the VM resumed.
ResultRow = tuple[Any, ...]


def unpack_results(replies: dict[int, list[ResultRow]]) -> list[DeviceResult]:
    """Every worker's :class:`Results` reply, as one list of DeviceResults."""
    return [DeviceResult(*row) for rows in replies.values() for row in rows]


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to :class:`Request` ``req``: a value, or an error's type, text and the
    worker's traceback (the coordinator chains it as the error's cause)."""

    req: int
    ok: bool
    value: Any = None
    error_type: str = ""
    error: str = ""
    traceback: str = ""
