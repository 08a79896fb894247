"""Jobs the coordinator gives its workers, and their replies: small picklable value types.

Bytes never travel in these; device state stays in the arena and on the channels. Each
:class:`Request` carries one :class:`Job` and gets exactly one :class:`Reply` with the same
``req`` number; the worker handles each kind of job in a function of its own
(:mod:`devstate.worker.loop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devstate.config.params import Schedule
from devstate.net.route import Routes
from devstate.net.tls import TlsConfig
from devstate.net.transport import Address
from devstate.planning.admission import TransferOrder
from devstate.report.migration import DeviceResult


class Job:
    """A request to a worker: one of the dataclasses below."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class OpenDevices(Job):
    """Build and open the devices this worker owns; ``incoming`` devices start blank."""

    devices: tuple[int, ...]
    incoming: bool


@dataclass(frozen=True, slots=True)
class ArmFault(Job):
    """Arm ``fault`` (``POINT:FAULT[:SKIP]``, :mod:`devstate.worker.faults`) in this worker; None
    disarms. Tests only."""

    fault: str | None


@dataclass(frozen=True, slots=True)
class ConnectChannels(Job):
    """Source: connect these data channels to the destination at ``address``.

    ``hellos`` pairs each channel index with the hello it opens with; ``tls`` (a
    :class:`~devstate.net.tls.TlsConfig`, or None) secures them.
    """

    address: Address
    hellos: tuple[tuple[int, bytes], ...]
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class AdoptChannel(Job):
    """Destination: data channel ``index``'s fd follows this message (SCM_RIGHTS).

    With ``tls`` the worker runs the TLS handshake itself, then reads the channel's hello
    again inside TLS, where it must equal ``hello`` (the plaintext one that routed it here).
    """

    index: int
    hello: bytes = b""
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class JoinMesh(Job):
    """This worker's end of its link to worker ``peer`` follows (SCM_RIGHTS)."""

    peer: int


@dataclass(frozen=True, slots=True)
class Save(Job):
    """Source: get and send these devices in this order, on the channels ``routes`` gives
    (operation number ``gen`` tags the handoffs between workers). Sent while the VM runs:
    the worker sets everything up and waits for SwitchOver (the stop), so that none of the
    set-up counts in the downtime. The devices in ``precopy`` stream meanwhile.

    ``vcpu_cpus`` and ``vcpu_threads`` say what the KVM VM's owner gets its vCPUs with
    (MigrationParams.vcpu_cpus, vcpu_threads).
    """

    order: tuple[int, ...]
    schedule: Schedule
    routes: Routes
    gen: int
    vcpu_cpus: tuple[int, ...] = ()
    vcpu_threads: int | None = None
    bandwidth_limit: float | None = None  # bytes/s over all channels, None: unlimited
    cap_stop_copy: bool = True  # the limit paces the stop-and-copy too (else precopy only)
    precopy: tuple[int, ...] = ()  # devices that stream while running, until SwitchOver
    transfer: TransferOrder | None = None  # stop-and-copy's order; None: all at once


@dataclass(frozen=True, slots=True)
class Armed(Job):
    """Source: reply once this worker's Save of operation ``gen`` waits for SwitchOver
    (True), or has ended without (False: its own reply says why)."""

    gen: int


@dataclass(frozen=True, slots=True)
class SwitchOver(Job):
    """Source, during a Save: the VM stops now; save everything (that is left, after a
    precopy)."""


@dataclass(frozen=True, slots=True)
class PrecopyRemaining(Job):
    """Source, during a precopy Save: bytes each precopy device still has to produce."""


@dataclass(frozen=True, slots=True)
class Progress(Job):
    """Source: the Save in progress so far, as (devices done, state bytes read)."""


@dataclass(frozen=True, slots=True)
class PrepareLoad(Job):
    """Destination, before the source stops: open a load session on each stream device."""

    devices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Load(Job):
    """Destination: receive and put these devices, verifying each one's digest.

    ``owner`` maps every device of the table to its destination worker: packets of devices
    owned elsewhere are handed over (operation number ``gen``). ``vcpu_cpus`` and
    ``vcpu_threads``: what the KVM VM's owner puts its vCPUs with, as for :class:`Save`.
    """

    devices: tuple[int, ...]
    schedule: Schedule
    owner: tuple[int, ...]
    gen: int
    vcpu_cpus: tuple[int, ...] = ()
    vcpu_threads: int | None = None
    vcpu_readback: bool = True  # read each vCPU back in its put's batch


@dataclass(frozen=True, slots=True)
class PrepareVcpus(Job):
    """Before the stop: start (and pin) the threads the next Save or Load gets or puts the
    KVM VM's vCPUs with (``cpus`` and ``threads`` as :class:`Save` will say), so that the
    stop-and-copy does not wait for them to start."""

    cpus: tuple[int, ...]
    threads: int | None


@dataclass(frozen=True, slots=True)
class VcpuCosts(Job):
    """What this worker's KVM vCPUs cost since the last ask (VcpuCost, or None)."""


@dataclass(frozen=True, slots=True)
class MapRam(Job):
    """The guest's RAM, a memfd of ``size`` bytes, follows (SCM_RIGHTS): map it (the VM's
    owner also gives it to KVM). Before OpenDevices."""

    size: int


@dataclass(frozen=True, slots=True)
class StartGuest(Job):
    """The VM's owner: a thread per vCPU. A source's vCPUs enter the guest program (which
    the coordinator installed in RAM) and run; a destination's (``paused``) wait for Resume."""

    paused: bool


@dataclass(frozen=True, slots=True)
class StopGuest(Job):
    """The VM's owner: every vCPU out of KVM_RUN; replies when the last one stopped
    (monotonic ns; 0 if no guest runs here). With ``switch_over``, if a guest stopped, the
    owner's armed Save then switches over at once, as :class:`SwitchOver` would: its vCPUs
    are read one round trip sooner (the coordinator switches the other workers over)."""

    switch_over: bool = False


@dataclass(frozen=True, slots=True)
class LogDirty(Job):
    """The VM's owner: start (the shared log emptied) or stop KVM's dirty log of the
    guest's RAM (:mod:`devstate.devices.kvm.dirty`)."""

    on: bool


@dataclass(frozen=True, slots=True)
class ThrottleGuest(Job):
    """The VM's owner: keep the guest's vCPUs stopped ``percent`` % of the time until the
    stop (auto-converge, :mod:`devstate.worker.throttle`)."""

    percent: int


@dataclass(frozen=True, slots=True)
class SyncDirty(Job):
    """The VM's owner: KVM's dirty log into the shared log; replies with, per RAM range, the
    pages it holds and how many of those were never sent."""


@dataclass(frozen=True, slots=True)
class GuestCheck(Job):
    """The VM's owner: what went wrong with the running vCPUs (an exit the guest should
    never make), or None."""


@dataclass(frozen=True, slots=True)
class Pause(Job):
    """Stop every owned device (the VM pauses on this side, outside any migration)."""


@dataclass(frozen=True, slots=True)
class ArmGuest(Job):
    """The VM's owner on a destination, before the load: wake the guest's vCPU threads to
    their entry barrier, where they touch no vCPU while the load puts them, so that
    :class:`Resume` only releases them after the commit
    (:meth:`devstate.devices.kvm.run.VcpuRunner.arm`)."""


@dataclass(frozen=True, slots=True)
class Resume(Job):
    """Run every owned device again (the VM resumes on this side); replies when the live
    guest's last vCPU was released into KVM_RUN (monotonic ns; 0: no guest here)."""


@dataclass(frozen=True, slots=True)
class Discard(Job):
    """Destination: drop what was loaded (the migration failed); devices back to blank."""


@dataclass(frozen=True, slots=True)
class Digests(Job):
    """Report each owned device's state digest (tests and reports; off the critical path)."""

    devices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SnapshotRecords(Job):
    """Get owned record devices (the first ``count``, or all) into this worker's arena
    slots, with no channel.

    One side of a migration alone (the scaling benchmarks measure each side apart, since
    both sides share the cores of one host; the cost model probes a sample). Replies with
    the worker's get time in ns and how many records it got.
    """

    count: int | None = None


@dataclass(frozen=True, slots=True)
class RestoreRecords(Job):
    """Put every record of the last :class:`SnapshotRecords` back; reply with the ns taken."""


@dataclass(frozen=True, slots=True)
class Results(Job):
    """Report the per-device results of the last Save or Load.

    Save and Load reply with a device count only: building, pickling and unpacking a
    result per device costs ~10 us each, so it happens after the VM resumed.
    """


@dataclass(frozen=True, slots=True)
class Cancel(Job):
    """Cancel the Save or Load in progress; its reply then reports the cancellation."""


@dataclass(frozen=True, slots=True)
class Shutdown(Job):
    """Close every device and channel and exit."""


@dataclass(frozen=True, slots=True)
class Request:
    """A numbered command to one worker."""

    req: int
    command: Job


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
    value: object = None
    error_type: str = ""
    error: str = ""
    traceback: str = ""
