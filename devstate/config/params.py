"""How to move a machine: the parameters of one migration, and their one serialised form.

A :class:`MigrationParams` is frozen. A change (QMP ``migrate-set-parameters``, a command
line flag) makes a new value with :func:`dataclasses.replace`; nothing mutates one. The
destination of a local migration gets the source's decision as one JSON object
(:meth:`MigrationParams.to_json` / :meth:`MigrationParams.from_json`), never field by field,
so a field added here reaches it without anyone remembering to pass it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from devstate.errors import SpecError


class Schedule(enum.StrEnum):
    """How each side's devices are saved and loaded: all at once, or one after another."""

    CONCURRENT = "concurrent"
    SEQUENTIAL = "sequential"  # the baseline: one device after another, as VMMs do today


class Routing(enum.StrEnum):
    """How a device's packets are spread over the data channels (:mod:`devstate.net.route`)."""

    AFFINITY = "affinity"
    SPREAD = "spread"


class Overrun(enum.StrEnum):
    """What stop-and-copy does when it passes the downtime limit."""

    FINISH = "finish"  # complete, and report the overrun and its cause
    ABORT = "abort"    # cancel: the destination discards, the source resumes unchanged


class Readback(enum.StrEnum):
    """When the destination checks that KVM took each vCPU's state as it was sent."""

    # In the put's own batch, natively: every vCPU is read back and compared before
    # LOADED, so a difference fails the migration and the source resumes. Costs a get
    # per vCPU of downtime (the report's kvm.readback_ms).
    BEFORE_COMMIT = "before-commit"
    # No readback in the put: the digests compared after the resume (each side reads its
    # vCPUs and hashes them) verify every vCPU, off the downtime, but a difference found
    # then can only be reported: the VM already runs on the destination.
    DIGEST = "digest"


# A peer timeout below a few heartbeats would take a busy peer for a frozen one; above an
# hour it no longer bounds anything a person waits for.
MIN_PEER_TIMEOUT_S = 0.5
# A stream packet's payload at least: a page of guest RAM (extents cut anywhere fit any
# packet over their 16-byte header, but a packet smaller than a page is only overhead).
MIN_CHUNK_BYTES = 4096
MAX_PEER_TIMEOUT_S = 3600.0


@dataclass(frozen=True, slots=True)
class MigrationParams:
    """How one side runs a migration: workers, schedule, channels, limits, policy, and the
    arena's shape.

    ``cpus`` pins workers; two sides on one host pass them in opposite orders so that each
    side's first worker gets a core of its own. ``chunk_bytes`` is a stream packet's
    payload: QEMU found 1 MiB as good as 128 MiB for mlx5 (hw/vfio/migration.c), and
    smaller means less memory per in-flight packet.
    ``chunk_slots`` bounds in-flight stream bytes per worker (memory vs pipelining:
    fewer slots stall a fast device behind a slow one sooner). ``record_slots`` lets a
    worker get that many records ahead of its channel. ``window_bytes`` is the receive
    window for small packets (records, END markers), read in one syscall; a destination
    worker receives on at most ``window_slots`` channels (a receive window each). Together
    these are the arena's memory budget.
    ``vcpu_threads``: the threads the VM's owner gets and puts kvm vCPUs with, each pinned
    to one of ``cpus`` (None: one per CPU the side may use, 1 with the ctypes engine, where
    more threads only fight over the GIL). A guest is one KVM VM, owned by one process
    (ARCHITECTURE.md section 3), so every kvm vCPU belongs to worker 0.
    ``vcpu_readback`` (a destination's): when it checks the vCPUs it put (:class:`Readback`).
    ``sharded_vms`` is an experiment, not a real guest shape: each worker creates a KVM VM
    of its own for its share of the vCPUs (KVM_SET_LAPIC is cheaper in smaller VMs, so it
    flatters put); kept for comparison, never a default.
    ``channels`` is the number of data channels (None: one per worker), the same setting
    for every device; ``routing`` puts a device's packets on its home channel (affinity) or
    spreads a stream's packets over all of them.
    ``bandwidth_limit`` (bytes/s, QEMU's max-bandwidth) limits what all channels send
    together (:mod:`devstate.net.bandwidth`); None: unlimited. With ``cap_stop_copy``
    false it paces only what moves while the VM runs, as QEMU's does (its stop-and-copy
    moves unthrottled).
    ``spec_order`` replaces the plan (longest work first, streams before records) with
    the baseline it must beat: devices in table order, dealt round-robin.
    ``precopy`` streams the devices that support it while the VM runs, and switches over
    once the expected downtime meets the limit (or, without one, once each is down to one
    chunk), within ``precopy_timeout_s``.
    ``downtime_limit_ms`` (QEMU's downtime-limit): no switchover while the cost model
    expects more (:mod:`devstate.planning.cost`), unless ``force_switchover``; during
    stop-and-copy, passing it either finishes and reports the overrun or aborts
    (``overrun``). An unmet limit fails the migration at once (the CLI's one-shot
    migration), unless ``wait_for_limit``: then the VM keeps running and the estimate is
    re-made until it fits the limit, which may be raised meanwhile (QEMU's behaviour, for a
    QMP controller; cancelling is the other way out). ``auto_converge`` (QEMU's
    capability): a live guest whose RAM precopy does not converge is throttled, its vCPUs
    kept stopped 20 % of the time, then 10 % more after each round that still does not
    converge (:mod:`devstate.worker.throttle`).
    ``peer_timeout_s``: how long either side of a running save and load waits with no word
    from its peer (a heartbeat, or any reply) before it gives up on it
    (:mod:`devstate.migration.liveness`); None: derived from the downtime limit and the
    estimate, between a floor and a ceiling.
    """

    workers: int = 2
    schedule: Schedule = Schedule.CONCURRENT
    chunk_bytes: int = 1 << 20
    chunk_slots: int = 16
    record_slots: int = 128
    window_bytes: int = 256 << 10
    cpus: tuple[int, ...] | None = None  # worker i runs on cpus[i % len]; None: usable CPUs
    vcpu_threads: int | None = None
    vcpu_readback: Readback = Readback.DIGEST
    sharded_vms: bool = False
    channels: int | None = None
    routing: Routing = Routing.AFFINITY
    window_slots: int = 4
    bandwidth_limit: float | None = None
    cap_stop_copy: bool = True
    spec_order: bool = False
    precopy: bool = False
    precopy_timeout_s: float = 10.0
    downtime_limit_ms: float | None = None
    overrun: Overrun = Overrun.FINISH
    force_switchover: bool = False
    wait_for_limit: bool = False
    auto_converge: bool = False
    peer_timeout_s: float | None = None
    fault: str | None = None  # tests: a fault for every worker to arm (devstate.worker.faults)

    def __post_init__(self) -> None:
        for name in ("workers", "chunk_bytes", "chunk_slots", "record_slots", "window_bytes",
                     "window_slots"):
            if getattr(self, name) < 1:
                raise SpecError(f"params.{name}", "must be at least 1")
        if self.chunk_bytes < MIN_CHUNK_BYTES:
            raise SpecError("params.chunk_bytes", f"must be at least {MIN_CHUNK_BYTES} B (a "
                                                  "page of guest RAM)")
        for name in ("channels", "vcpu_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SpecError(f"params.{name}", "must be at least 1")
        if self.peer_timeout_s is not None and not \
                MIN_PEER_TIMEOUT_S <= self.peer_timeout_s <= MAX_PEER_TIMEOUT_S:
            raise SpecError("params.peer_timeout_s", f"must be between {MIN_PEER_TIMEOUT_S} "
                                                     f"and {MAX_PEER_TIMEOUT_S:.0f} s")

    @property
    def concurrent(self) -> bool:
        """Whether devices are saved and loaded at once (not one after another)."""
        return self.schedule is Schedule.CONCURRENT

    @property
    def data_channels(self) -> int:
        """How many data channels a migration from this side opens."""
        return self.channels or self.workers

    @property
    def vcpu_cpus(self) -> tuple[int, ...]:
        """The CPUs the vCPU owner's threads may be pinned to, in order."""
        return tuple(self.cpus or sorted(os.sched_getaffinity(0)))

    def vcpu_threads_for(self, concurrent: bool) -> int | None:
        """``vcpu_threads``, except that a sequential migration takes one vCPU at a time."""
        return self.vcpu_threads if concurrent else 1

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON data, read back equal by :meth:`from_json`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: Any) -> MigrationParams:
        """Parameters from :meth:`to_json`'s form; a missing field takes its default, an
        unknown or ill-typed one is a :class:`SpecError` naming it."""
        if not isinstance(data, dict):
            raise SpecError("params", "must be a JSON object")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise SpecError(f"params.{unknown[0]}", "is not a migration parameter")
        return cls(**{name: _decode(f"params.{name}", hints[name], value)
                      for name, value in data.items()})


def _decode(path: str, hint: Any, value: Any) -> Any:
    """``value`` as the field type ``hint`` (the few types MigrationParams uses)."""
    if isinstance(hint, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise SpecError(path, "must be a list")
        return tuple(_decode(f"{path}[{i}]", int, v) for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise SpecError(path, f"{value!r} is not one of "
                                  f"{', '.join(str(m.value) for m in hint)}") from None
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise SpecError(path, f"must be {getattr(hint, '__name__', hint)}, not {value!r}")
