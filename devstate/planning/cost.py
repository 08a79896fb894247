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
* a live guest's **RAM** is a part of its own (its ranges are cheap sessions and cross
  at their own rate, not VFIO's): the bytes precopy left for the stop (what the guest
  dirtied in the last round) at ``ram_bytes_per_s`` (read, sent, written, and the digest's
  pieces they fall in hashed again), those of them never sent before again at
  ``ram_fault_bytes_per_s`` (holes on the destination: the write faults each page in),
  and each range's own work at the stop (``ram_range_ms``: its part of the dirty log, its
  END, its digest) on the cores;

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

A bandwidth cap (``max-bandwidth``) bounds the streams as the pacers apply it
(:class:`Link`, :mod:`devstate.net.bandwidth`): a stream's bytes cross no faster than its
channel's share of the cap, so its own path and its turn in the transfer order are the
slower of the host's copies and the cap. A capped run is never learned from: its rates
were the cap's, not the host's (:meth:`CostHistory.save_run`).
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from devstate.config.params import MigrationParams, Routing
from devstate.config.spec import DeviceSpec, DeviceTable
from devstate.planning.plan import Plan

# How far one run moves a term's scale toward its observed ratio.
REFINE_WEIGHT = 0.5
# Ratios outside this band are not learned from: a run that far off was disturbed.
LEARNABLE = (0.25, 4.0)
# Host-critical runs kept for the fit: recent enough to follow the host, enough to fit.
KEPT_RUNS = 24
# A host part is fitted once it was at least this share of some run's downtime.
FIT_SHARE = 0.15
# The cost model's terms, as stored runs record them (2: streams in transfer order; runs of
# sequential mode not learned from; 3: guest RAM a part of its own; 4: RAM's digest hashed
# as it arrives, so the stop costs RAM's ranges and not its size; 5: RAM's pages never sent
# before fault in on the destination).
MODEL = 5


@dataclass(frozen=True, slots=True)
class Link:
    """A migration's bandwidth cap as the source's pacers apply it: ``limit`` bytes/s in
    all, ``limit / channels`` on each channel. With affinity routing a stream rides its
    owner's home channel (``owner % channels``), so it gets one channel's share; spread
    over every channel it gets the whole cap."""

    limit: float
    channels: int
    spread: bool = False

    def lane(self, owner: int) -> int:
        """The channel a stream of source worker ``owner`` rides (-1: all of them)."""
        return -1 if self.spread else owner % self.channels

    def rate(self, lane: int) -> float:
        """What ``lane`` carries, in bytes/s."""
        return self.limit if lane < 0 else self.limit / self.channels


@dataclass(frozen=True, slots=True)
class HostCosts:
    """The calibrated constants of one host (defaults: this project's 2-core machine)."""

    cores: int = 2
    copy_bytes_per_s: float = 1.3e9   # stream bytes through both sides' copies, together
    record_overhead_us: float = 30.0  # runtime work per record beyond its get and put
    stream_overhead_ms: float = 4.0   # per stream device on its owner: session, END, end
    fixed_ms: float = 8.0             # stop, dispatch, LOADED / COMMIT / RESUMED
    # Guest RAM left for the stop (read, sent, written, its pieces of the digest hashed
    # again), those of its bytes the destination never received once more (written into
    # holes, each page faulted in: alone, 19 MiB took 11.8 ms so and 1.0 ms again), and
    # each RAM range's own work at the stop (its part of the dirty log, END, the digest
    # of its pieces): least squares (relative errors) over two runs of the calibration set
    # of benches/test_bench_live_ram.py (16-288 vCPUs, 256 MiB-3 GiB, 0-290 MiB left,
    # 0-30 MiB of it never sent, 1 or 2 workers) on this project's 2-core machine.
    ram_bytes_per_s: float = 2.6e9
    ram_fault_bytes_per_s: float = 1.35e9
    ram_range_ms: float = 0.025
    scale: dict[str, float] = field(default_factory=dict)  # learned, for device terms
    # Learned weights of the host term's parts (copies, records, sessions, RAM; firmware
    # 1), and the host-critical runs they were fitted to: [parts..., firmware, actual -
    # fixed].
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    runs: tuple[tuple[float, float, float, float, float, float], ...] = ()
    # The migration's bandwidth cap: a property of one run, never stored (see capped()).
    link: Link | None = None

    def capped(self, params: MigrationParams) -> HostCosts:
        """These constants for a migration with ``params``: with its bandwidth cap, if any."""
        # A limit that paces only the precopy leaves the stop-and-copy uncapped.
        link = None if params.bandwidth_limit is None or not params.cap_stop_copy else Link(
            params.bandwidth_limit, params.data_channels, params.routing is Routing.SPREAD)
        return replace(self, link=link)

    def to_json(self) -> dict[str, Any]:
        """The constants as :class:`CostHistory` stores them (a run's cap is not stored)."""
        data = asdict(self)
        del data["link"]
        return data


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
    sessions, guest RAM, last firmware (what :func:`refine` fits the weights to).
    """

    expected_ms: float
    terms: tuple[Term, ...]
    host_parts: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    @property
    def critical(self) -> Term:
        """The term that sets the downtime."""
        return self.terms[0]

    def explain(self, terms: int = 3) -> str:
        """The critical path and the next terms, one line each."""
        return "; ".join(f"{t.what}: {t.ms:.0f} ms" for t in self.terms[:terms])


def estimate(table: DeviceTable, plan: Plan, host: HostCosts,
             record_us: tuple[float, float] | None = None,
             remaining: dict[int, int] | None = None,
             unsent: dict[int, int] | None = None, *,
             sequential: bool = False) -> Estimate:
    """Expected stop-and-copy downtime of ``table`` moved by ``plan`` (its workers per side,
    its transfer order); ``sequential``: one device after another, as VMMs do today.

    ``record_us`` is the measured (get, put) of one record in µs; None takes the spec's
    sim-vcpu costs. ``remaining`` gives, for devices in precopy, the bytes they have left
    (by device index): only those are left for stop-and-copy; ``unsent``, of a RAM
    range's, the bytes never sent before (None: none).
    """
    left = remaining or {}
    streams = [d for d in table if d.stream is not None]
    get_us, put_us = record_us if record_us is not None else (
        table.machine.vcpus.get_us, table.machine.vcpus.put_us)
    size = {d.index: left.get(d.index, d.stream.size) for d in streams if d.stream is not None}
    cap = {d.index: _capped_rate(host, plan, d.index) for d in streams}
    ram = {d.index for d in streams if d.ram is not None}
    # Written into holes on the destination: the faults come on top of the bytes' own cost.
    ram_unsent = sum((unsent or {}).get(i, 0) for i in ram)
    if sequential:
        return _sequential(table, host, get_us + put_us, size, cap, ram_unsent)
    terms = [_device_term(d, size[d.index], cap[d.index], host) for d in streams]
    # Streams move in the plan's order (devstate.planning.admission): each one's last byte
    # crosses once the bytes of those before it have, then its firmware runs; the latest of
    # those ends the streams' share of the host term (Jackson's bound for one shared
    # resource). Under a cap the same holds per channel, at the channel's share.
    arrival, moved = {}, 0
    for index in plan.transfer:
        if index in ram:
            continue  # RAM crosses as a part of its own (_host_term)
        moved += size[index]
        arrival[index] = moved / host.copy_bytes_per_s * 1e3
    on_link = _link_arrival(host.link, plan, size)
    crossed = {i: max(ms * host.weights[0], on_link.get(i, 0.0)) for i, ms in arrival.items()}
    terms.extend(_chains(table, size, crossed, cap, host))
    host_term, parts = _host_term(table, plan, host, arrival, crossed, moved,
                                  get_us + put_us, sum(size[i] for i in ram), ram_unsent)
    terms.append(host_term)
    terms.sort(key=lambda t: -t.ms)
    return Estimate(host.fixed_ms + terms[0].ms, tuple(terms), parts)


def _capped_rate(host: HostCosts, plan: Plan, index: int) -> float:
    """The most stream ``index`` may send per second under the cap (inf: no cap)."""
    if host.link is None:
        return math.inf
    return host.link.rate(host.link.lane(plan.owner[index]))


def _link_arrival(link: Link | None, plan: Plan, size: dict[int, int]) -> dict[int, float]:
    """When each stream's last byte has passed the cap (ms), the streams taking their
    channels in transfer order; empty without a cap."""
    if link is None:
        return {}
    moved: dict[int, int] = {}
    out = {}
    for index in plan.transfer:
        lane = link.lane(plan.owner[index])
        moved[lane] = moved.get(lane, 0) + size[index]
        out[index] = moved[lane] / link.rate(lane) * 1e3
    return out


def _device_term(d: DeviceSpec, size: int, cap: float, host: HostCosts) -> Term:
    """One stream's own path: its bytes at its slower rate (or the cap's, if lower), then
    its firmware."""
    v = d.stream
    assert v is not None
    rate = min(v.rate, cap)
    capped = " (the bandwidth cap)" if cap < v.rate else ""
    return Term("device", f"{d.id} alone: {size / 2**20:.0f} MiB at {rate / 2**20:.0f} "
                          f"MiB/s{capped} + {v.firmware_latency_ms:.0f} ms firmware",
                (size / rate * 1e3 + v.firmware_latency_ms) * host.scale.get("device", 1.0))


def _host_term(table: DeviceTable, plan: Plan, host: HostCosts, arrival: dict[int, float],
               crossed: dict[int, float], moved: int, record_us: float, ram_left: int,
               ram_unsent: int) -> tuple[Term, tuple[float, float, float, float, float]]:
    """The work every device shares on this host: VFIO stream copies in transfer order (and
    the firmware of the last to arrive), record gets and puts on the cores, stream
    sessions, and a live guest's RAM (``ram_left`` bytes to send, ``ram_unsent`` of them
    never sent before, and every range's digest).
    ``arrival`` is when each VFIO stream's last byte is copied (ms, unweighted),
    ``crossed`` the same weighted and no sooner than the cap lets it pass. Returns the
    term and its unweighted parts (copy, records, sessions, RAM, firmware)."""
    records = [d for d in table if d.stream is None]
    firmware = {i: table[i].stream.firmware_latency_ms  # type: ignore[union-attr]
                for i in arrival}
    ram_ranges = sum(1 for d in table if d.ram is not None)
    _, w_records, w_sessions, w_ram = host.weights
    last = max(crossed, key=lambda i: (crossed[i] + firmware[i], i), default=None)
    last_firmware = firmware[last] if last is not None else 0.0
    record_ms = len(records) * (record_us + host.record_overhead_us) / 1e3 / host.cores
    sessions_ms = -(-len(firmware) // plan.workers) * host.stream_overhead_ms
    # The ranges ride every channel: under a cap they share all of it.
    ram_rate = min(host.ram_bytes_per_s, host.link.limit if host.link else math.inf)
    ram_ms = (ram_left / ram_rate + ram_unsent / host.ram_fault_bytes_per_s) * 1e3 \
        + ram_ranges * host.ram_range_ms / host.cores
    parts = (arrival[last] if last is not None else 0.0, record_ms, sessions_ms, ram_ms,
             last_firmware)
    copy_ms = crossed[last] if last is not None else 0.0
    record_ms, sessions_ms, ram_ms = record_ms * w_records, sessions_ms * w_sessions, \
        ram_ms * w_ram
    said = [f"{len(records)} records ({record_ms:.0f} ms on {host.cores} cores)"]
    if ram_ranges:
        said.append(f"guest RAM: {ram_left / 2**20:.1f} MiB left ({ram_unsent / 2**20:.1f} "
                    f"never sent) in {ram_ranges} ranges ({ram_ms:.0f} ms)")
    if last is not None:
        said[:0] = [f"{moved / 2**20:.0f} MiB of streams, through {table[last].id} "
                    f"({copy_ms:.0f} ms)"]
        said += [f"{len(firmware)} stream sessions ({sessions_ms:.0f} ms)",
                 f"then its firmware {last_firmware:.0f} ms"]
    return Term("host", "host: " + ", ".join(said),
                copy_ms + record_ms + sessions_ms + ram_ms + last_firmware), parts


def _sequential(table: DeviceTable, host: HostCosts, record_us: float,
                size: dict[int, int], cap: dict[int, float], ram_unsent: int) -> Estimate:
    """One device after another: the sum of every stream's bytes (at its slower rate, or
    the host's copy rate or the cap if slower; a RAM range at its own channel's share of
    the cap) and firmware, the faults of the ``ram_unsent`` bytes, every record's get and
    put, and every stream's session. The sum is the critical path: nothing overlaps."""
    streams_ms = ram_unsent / host.ram_fault_bytes_per_s * 1e3
    for d in table:
        if d.ram is not None:
            streams_ms += size[d.index] / min(host.ram_bytes_per_s, cap[d.index]) * 1e3 \
                + host.ram_range_ms
        elif d.stream is not None:
            rate = min(d.stream.rate, host.copy_bytes_per_s, cap[d.index])
            streams_ms += size[d.index] / rate * 1e3 + d.stream.firmware_latency_ms \
                + host.stream_overhead_ms
    records = sum(1 for d in table if d.stream is None)
    records_ms = records * (record_us + host.record_overhead_us) / 1e3
    term = Term("sequential", f"one device after another: {len(size)} streams with their "
                        f"firmware ({streams_ms:.0f} ms), {records} records "
                        f"({records_ms:.0f} ms)", streams_ms + records_ms)
    return Estimate(host.fixed_ms + term.ms, (term,))


def _chains(table: DeviceTable, size: dict[int, int], arrival: dict[int, float],
            cap: dict[int, float], host: HostCosts) -> list[Term]:
    """Dependency chains: a device completes its load (firmware, or a record's put) only
    after the devices it loads after (spec ``after``), so its own path may start late; a
    stream's own path (at its rate, or the cap's) ends no sooner than its turn in the
    transfer (``arrival``, ms)."""
    by_id = {d.id: d for d in table}
    done: dict[str, float] = {}

    def completion(d: DeviceSpec) -> float:
        if d.id not in done:
            ready = max((completion(by_id[a]) for a in d.after), default=0.0)
            own = fw = 0.0
            if d.stream is not None:
                own = max(size[d.index] / min(d.stream.rate, cap[d.index]) * 1e3,
                          arrival.get(d.index, 0.0))
                fw = d.stream.firmware_latency_ms
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
         weights: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Least-squares weights of the host parts over ``runs`` (relative errors, so a short
    run counts as much as a long one); the old weights where the runs cannot decide one
    (a part every run lacks) or the fit is not sane."""
    data = np.array(runs, dtype=float)
    parts, firmware, actual = data[:, :4], data[:, 4], data[:, 5]
    # A part that is a sliver of every run cannot be told from the runs' noise: fitted, it
    # soaks the residuals up (a 7 ms RAM part weighed 8.7 to cover a 300 ms VFIO wobble,
    # then overestimated a RAM-heavy run tenfold). It keeps its weight until runs show it.
    used = [k for k in range(4) if np.any(parts[:, k] >= FIT_SHARE * actual)]
    if len(runs) < len(used) + 1 or not used:
        return weights
    scale = 1.0 / np.maximum(actual, 1e-3)
    kept = [k for k in range(4) if k not in used]  # at their weights, off the target
    target = actual - firmware - parts[:, kept] @ np.array([weights[k] for k in kept])
    solution, *_ = np.linalg.lstsq(parts[:, used] * scale[:, None], target * scale,
                                   rcond=None)
    fitted = list(weights)
    for k, value in zip(used, solution, strict=True):
        if 0.1 <= value <= 10.0:
            fitted[k] = float(value)
    return fitted[0], fitted[1], fitted[2], fitted[3]


class CostHistory:
    """This host's refined constants, kept between runs in a small JSON file.

    The file is ``path``, else ``$DEVSTATE_COSTS``, else
    ``~/.cache/devstate/costs-v<MODEL>-<host>.json``: one per host and user, shared by every
    run that does not name another, so identical runs see different estimates as it learns
    (docs/costs.md). It is only ever a cache: a missing or unreadable one means the
    defaults. ``MODEL`` changes when the terms do, so runs fitted to other terms are not
    mixed in. With ``learn`` false the file is read and never written.
    """

    def __init__(self, path: Path | None = None, *, learn: bool = True) -> None:
        default = (Path.home() / ".cache" / "devstate"
                   / f"costs-v{MODEL}-{socket.gethostname()}.json")
        self.path = path or Path(os.environ.get("DEVSTATE_COSTS", default))
        self.learn = learn

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
        """Learn from one run (:func:`refine`) and store what was learned.

        A run under a bandwidth cap (``host.link``) is not learned from: its streams moved at
        the cap's rate, and fitting the host's constants to it would slow every later
        estimate of uncapped runs. Nor is anything stored with ``learn`` false.
        """
        if self.learn and host.link is None:
            self.save(refine(host, made, actual_ms))

    def save(self, host: HostCosts) -> None:
        """Store ``host`` (without a run's cap); a cache that cannot be written is not an
        error of the run."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(host.to_json()))
            tmp.replace(self.path)
        except OSError:
            pass

    def reset(self) -> bool:
        """Forget what was learned (remove the file); whether there was anything."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True
