"""What stop-and-copy will cost, before the VM stops: the cost model and its estimate.

Runs in: the source coordinator, before switchover (off the critical path).

Unlike QEMU's estimate, which counts only RAM, the downtime here is the slowest of:

* each **device's own path**: its state at the slower of its read and write rates, plus
  its firmware load (``size / min(read, write) + firmware``): no amount of concurrency
  makes one device faster than that;
* the **host's work**: stream bytes cross both sides' copies (``copy_bytes_per_s``,
  calibrated for this host) in the plan's transfer order, so a stream's firmware starts
  once the bytes before and of it have crossed: the latest such end counts; every record
  costs its get, its put and the runtime's per-record work on the cores both sides share,
  and every stream device costs its session round trips on its owner;

plus a fixed cost (stop, dispatch, the LOADED/COMMIT/RESUMED round trips). The largest
term is the **critical path**: the estimate names it, so a limit that cannot be met says
why. Record costs come from the spec (sim-vcpu) or from probes (kvm: a worker gets and
puts its vCPUs once before the stop, :meth:`devstate.migration.source.SourceVM.probe_records`).

The host's constants start from defaults measured on this project's 2-core machine and are
refined from earlier runs on the same machine (:class:`CostHistory`, :func:`refine`): runs
whose host term was critical are kept (its parts, and the downtime they came to), and once
there are enough of them the weights of the parts are refitted by least squares; a run
that one device's own path decided scales that kind of term by how far it was off (an
exponentially weighted mean).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from devstate.config.spec import DeviceSpec, DeviceTable
from devstate.planning.plan import Plan

# How far one run moves a term's scale toward its observed ratio.
REFINE_WEIGHT = 0.5
# Ratios outside this band are not learned from: a run that far off was disturbed.
LEARNABLE = (0.25, 4.0)
# Host-critical runs kept for the fit: recent enough to follow the host, enough to fit.
KEPT_RUNS = 24
# The cost model's terms, as stored runs record them (2: streams in transfer order; runs of
# sequential mode not learned from).
MODEL = 2


@dataclass(frozen=True, slots=True)
class HostCosts:
    """The calibrated constants of one host (defaults: this project's 2-core machine)."""

    cores: int = 2
    copy_bytes_per_s: float = 1.3e9   # stream bytes through both sides' copies, together
    record_overhead_us: float = 30.0  # runtime work per record beyond its get and put
    stream_overhead_ms: float = 4.0   # per stream device on its owner: session, END, end
    fixed_ms: float = 8.0             # stop, dispatch, LOADED / COMMIT / RESUMED
    scale: dict[str, float] = field(default_factory=dict)  # learned, for device terms
    # Learned weights of the host term's parts (copies, records, sessions; firmware 1),
    # and the host-critical runs they were fitted to: [parts..., firmware, actual - fixed].
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    runs: tuple[tuple[float, float, float, float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Term:
    """One lower bound on the downtime: which resource or device, and what it takes."""

    kind: str   # "device" (one device's own path), "host" (the shared work), "sequential"
    what: str   # for a person: the device or resource and the arithmetic
    ms: float


@dataclass(frozen=True, slots=True)
class Estimate:
    """The expected downtime and the terms it is the largest of (largest first).

    ``host_parts`` are the host term's unweighted parts in ms: copies, records, stream
    sessions, last firmware (what :func:`refine` fits the weights to).
    """

    expected_ms: float
    terms: tuple[Term, ...]
    host_parts: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def critical(self) -> Term:
        """The term that sets the downtime."""
        return self.terms[0]

    def explain(self, terms: int = 3) -> str:
        """The critical path and the next terms, one line each."""
        return "; ".join(f"{t.what}: {t.ms:.0f} ms" for t in self.terms[:terms])


def estimate(table: DeviceTable, plan: Plan, host: HostCosts,
             record_us: tuple[float, float] | None = None,
             remaining: dict[int, int] | None = None, *,
             sequential: bool = False) -> Estimate:
    """Expected stop-and-copy downtime of ``table`` moved by ``plan`` (its workers per side,
    its transfer order); ``sequential``: one device after another, as VMMs do today.

    ``record_us`` is the measured (get, put) of one record in µs; None takes the spec's
    sim-vcpu costs. ``remaining`` gives, for devices in precopy, the bytes they have left
    (by device index): only those are left for stop-and-copy.
    """
    left = remaining or {}
    streams = [d for d in table if d.vfio is not None]
    get_us, put_us = record_us if record_us is not None else (
        table.machine.vcpus.get_us, table.machine.vcpus.put_us)
    if sequential:
        return _sequential(table, host, get_us + put_us, {
            d.index: left.get(d.index, d.vfio.size) for d in streams if d.vfio is not None})
    size = {d.index: left.get(d.index, d.vfio.size) for d in streams if d.vfio is not None}
    terms = [_device_term(d, size[d.index], host) for d in streams]
    # Streams move in the plan's order (devstate.planning.admission): each one's last byte
    # crosses once the bytes of those before it have, then its firmware runs; the latest of
    # those ends the streams' share of the host term (Jackson's bound for one shared
    # resource).
    arrival, moved = {}, 0
    for index in plan.transfer:
        moved += size[index]
        arrival[index] = moved / host.copy_bytes_per_s * 1e3
    terms.extend(_chains(table, size, {i: ms * host.weights[0]
                                       for i, ms in arrival.items()}, host))
    host_term, parts = _host_term(table, plan, host, arrival, moved, get_us + put_us)
    terms.append(host_term)
    terms.sort(key=lambda t: -t.ms)
    return Estimate(host.fixed_ms + terms[0].ms, tuple(terms), parts)


def _device_term(d: DeviceSpec, size: int, host: HostCosts) -> Term:
    """One stream's own path: its bytes at its slower rate, then its firmware."""
    v = d.vfio
    assert v is not None
    return Term("device", f"{d.id} alone: {size / 2**20:.0f} MiB at {v.rate / 2**20:.0f} "
                          f"MiB/s + {v.firmware_latency_ms:.0f} ms firmware",
                (size / v.rate * 1e3 + v.firmware_latency_ms) * host.scale.get("device", 1.0))


def _host_term(table: DeviceTable, plan: Plan, host: HostCosts, arrival: dict[int, float],
               moved: int, record_us: float
               ) -> tuple[Term, tuple[float, float, float, float]]:
    """The work every device shares on this host: stream copies in transfer order (and the
    firmware of the last to arrive), record gets and puts on the cores, stream sessions.
    Returns the term and its unweighted parts (copy, records, sessions, firmware)."""
    records = [d for d in table if d.vfio is None]
    firmware = {d.index: d.vfio.firmware_latency_ms for d in table if d.vfio is not None}
    w_copy, w_records, w_sessions = host.weights
    last = max(arrival, key=lambda i: (arrival[i] * w_copy + firmware[i], i), default=None)
    copy_ms = arrival[last] if last is not None else 0.0
    last_firmware = firmware[last] if last is not None else 0.0
    record_ms = len(records) * (record_us + host.record_overhead_us) / 1e3 / host.cores
    sessions_ms = -(-len(firmware) // plan.workers) * host.stream_overhead_ms
    parts = (copy_ms, record_ms, sessions_ms, last_firmware)
    copy_ms, record_ms, sessions_ms = copy_ms * w_copy, record_ms * w_records, \
        sessions_ms * w_sessions
    said = [f"{len(records)} records ({record_ms:.0f} ms on {host.cores} cores)"]
    if last is not None:
        said[:0] = [f"{moved / 2**20:.0f} MiB of streams, through {table[last].id} "
                    f"({copy_ms:.0f} ms)"]
        said += [f"{len(firmware)} stream sessions ({sessions_ms:.0f} ms)",
                 f"then its firmware {last_firmware:.0f} ms"]
    return Term("host", "host: " + ", ".join(said),
                copy_ms + record_ms + sessions_ms + last_firmware), parts


def _sequential(table: DeviceTable, host: HostCosts, record_us: float,
                size: dict[int, int]) -> Estimate:
    """One device after another: the sum of every stream's bytes (at its slower rate, or
    the host's copy rate if slower) and firmware, every record's get and put, and every
    stream's session. The sum is the critical path: nothing overlaps."""
    streams_ms = 0.0
    for d in table:
        if d.vfio is not None:
            rate = min(d.vfio.rate, host.copy_bytes_per_s)
            streams_ms += size[d.index] / rate * 1e3 + d.vfio.firmware_latency_ms \
                + host.stream_overhead_ms
    records = sum(1 for d in table if d.vfio is None)
    records_ms = records * (record_us + host.record_overhead_us) / 1e3
    term = Term("sequential", f"one device after another: {len(size)} streams with their "
                        f"firmware ({streams_ms:.0f} ms), {records} records "
                        f"({records_ms:.0f} ms)", streams_ms + records_ms)
    return Estimate(host.fixed_ms + term.ms, (term,))


def _chains(table: DeviceTable, size: dict[int, int], arrival: dict[int, float],
            host: HostCosts) -> list[Term]:
    """Dependency chains: a device completes its load (firmware, or a record's put) only
    after the devices it loads after (spec ``after``), so its own path may start late; a
    stream's own path ends no sooner than its turn in the transfer (``arrival``, ms)."""
    by_id = {d.id: d for d in table}
    done: dict[str, float] = {}

    def completion(d: DeviceSpec) -> float:
        if d.id not in done:
            ready = max((completion(by_id[a]) for a in d.after), default=0.0)
            own = fw = 0.0
            if d.vfio is not None:
                own = max(size[d.index] / d.vfio.rate * 1e3, arrival.get(d.index, 0.0))
                fw = d.vfio.firmware_latency_ms
            done[d.id] = max(own, ready) + fw
        return done[d.id]

    terms = []
    seen_vcpus = False
    for d in table:
        if not d.after or (d.vcpu is not None and seen_vcpus):
            continue  # every vCPU has the same dependencies: one term for them all
        seen_vcpus = seen_vcpus or d.vcpu is not None
        name = "cpu/*" if d.vcpu is not None else d.id
        chain = max(d.after, key=lambda a: completion(by_id[a]))
        terms.append(Term("device", f"{name} after {chain}",
                          completion(d) * host.scale.get("device", 1.0)))
    return terms


def refine(host: HostCosts, made: Estimate, actual_ms: float) -> HostCosts:
    """``host`` after a run that took ``actual_ms`` where ``made`` expected otherwise."""
    ratio = (actual_ms - host.fixed_ms) / max(1e-6, made.expected_ms - host.fixed_ms)
    if not LEARNABLE[0] <= ratio <= LEARNABLE[1] or made.critical.kind == "sequential":
        # A run that far off was disturbed; a sequential run's sum has no weights to fit.
        return host
    if made.critical.kind == "device":
        old = host.scale.get("device", 1.0)
        return replace(host, scale={**host.scale,
                                    "device": old * (1 - REFINE_WEIGHT + REFINE_WEIGHT * ratio)})
    runs = (*host.runs, (*made.host_parts, actual_ms - host.fixed_ms))[-KEPT_RUNS:]
    return replace(host, runs=runs, weights=_fit(runs, host.weights))


def _fit(runs: tuple[tuple[float, ...], ...],
         weights: tuple[float, float, float]) -> tuple[float, float, float]:
    """Least-squares weights of the host parts over ``runs`` (relative errors, so a short
    run counts as much as a long one); the old weights where the runs cannot decide one
    (a part every run lacks) or the fit is not sane."""
    data = np.array(runs, dtype=float)
    parts, firmware, actual = data[:, :3], data[:, 3], data[:, 4]
    used = [k for k in range(3) if np.any(parts[:, k] > 0)]
    if len(runs) < len(used) + 1 or not used:
        return weights
    scale = 1.0 / np.maximum(actual, 1e-3)
    solution, *_ = np.linalg.lstsq(parts[:, used] * scale[:, None],
                                   (actual - firmware) * scale, rcond=None)
    fitted = list(weights)
    for k, value in zip(used, solution, strict=True):
        if 0.1 <= value <= 10.0:
            fitted[k] = float(value)
    return fitted[0], fitted[1], fitted[2]


class CostHistory:
    """This host's refined constants, kept between runs in a small JSON file.

    The file is ``$DEVSTATE_COSTS`` or ``~/.cache/devstate/costs-v<MODEL>-<host>.json``; it
    is only ever a cache: a missing or unreadable one means the defaults. ``MODEL`` changes
    when the terms do, so runs fitted to other terms are not mixed in.
    """

    def __init__(self, path: Path | None = None) -> None:
        default = (Path.home() / ".cache" / "devstate"
                   / f"costs-v{MODEL}-{socket.gethostname()}.json")
        self.path = path or Path(os.environ.get("DEVSTATE_COSTS", default))

    def load(self) -> HostCosts:
        """The stored constants, or the defaults (with this host's core count)."""
        cores = len(os.sched_getaffinity(0))
        try:
            data = json.loads(self.path.read_text())
            data["weights"] = tuple(data["weights"])
            data["runs"] = tuple(tuple(run) for run in data["runs"])
            return replace(HostCosts(**data), cores=cores)
        except (OSError, ValueError, TypeError, KeyError):
            return HostCosts(cores=cores)

    def save_run(self, host: HostCosts, made: Estimate, actual_ms: float) -> None:
        """Learn from one run (:func:`refine`) and store what was learned."""
        self.save(refine(host, made, actual_ms))

    def save(self, host: HostCosts) -> None:
        """Store ``host``; a cache that cannot be written is not an error of the run."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(host)))
            tmp.replace(self.path)
        except OSError:
            pass
