"""One pool for every device against a private thread and channel per device.

The design question of the seed thread (shared/seed/): devstate's pool of workers shared by
all devices (2 workers a side, concurrent), or what the thread first proposed and QEMU 10
does for VFIO without multifd's shared channels: a thread and a channel of its own per VFIO
device, the vCPUs in the main stream on the main thread (benches/per_device_threads.py).
The machine is mixed (benches/scenarios/pool-vs-threads.toml): 256 sim vCPUs and four
vfio-sim devices of 16-64 MiB with 50-200 ms of firmware latency.

Downtime has the same end points in both: from the source's stop (t0) to the destination's
RESUMED received back on the source (every device loaded, completed and resumed), on the
source's clock. The baseline also reports LOADED's arrival, one round trip and a resume
earlier. Both verify every device's ``digest()`` on both sides, off the critical path.

Run: ``python -m pytest benches/test_bench_pool_vs_threads.py --benchmark-only``: one
warm-up round, then ROUNDS rounds, each migrating the machine both ways, first one way then
the other in turn (ABBA), so drift on this shared 2-core host hits both alike. extra_info
holds the medians and ``threads_over_pool`` (> 1: the pool's downtime is shorter); who
wins is reported, never asserted. (No CPU figure: devstate's destination workers are
children of a forkserver that outlives its parent, so their CPU time never reaches this
process's accounting, and a comparison would favour the pool.) The pool's workers are
pinned to CPUs, the baseline's threads are not. Quick mode
(``--benchmark-disable``) runs one round. Every mode asserts both variants verified.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from benches import per_device_threads
from benches.verified import migrate_verified
from devstate.config.params import MigrationParams
from devstate.config.spec import load_spec
from devstate.devices import device_table

SPEC = load_spec(Path(__file__).resolve().parent / "scenarios" / "pool-vs-threads.toml")
DEVICES = len(device_table(SPEC))
# A round is two migrations of ~1.5-3 s each, process starts included: six rounds and the
# warm-up stay within ~90 s on two cores; an even count makes each variant first as often.
ROUNDS = 6


def _pool() -> float:
    """devstate: a worker pool a side, one migration; its downtime in ms, to RESUMED
    received as the baseline's (devstate's own ends one hop sooner, at the resume)."""
    report = migrate_verified(SPEC, MigrationParams())
    assert len(report.devices) == DEVICES, f"pool: {len(report.devices)} devices moved"
    assert report.resumed_seen_ms is not None
    return report.resumed_seen_ms


def _threads(loaded: list[float]) -> Callable[[], float]:
    def migrate() -> float:
        """The baseline: a thread and a channel per device; its downtime in ms."""
        report = per_device_threads.migrate(SPEC)
        assert report.verified and report.devices == DEVICES, \
            f"threads: {report.checked} of {DEVICES} devices compared, differing: " \
            f"{list(report.mismatched)}"
        loaded.append(report.loaded_ms)
        return report.downtime_ms
    return migrate


@pytest.mark.benchmark(group="pool-vs-threads")
def test_pool_vs_threads(benchmark, results) -> None:
    loaded: list[float] = []
    variants = [("pool", _pool), ("threads", _threads(loaded))]
    downtimes: dict[str, list[float]] = {name: [] for name, _ in variants}

    def both() -> None:
        in_turn = variants if len(downtimes["pool"]) % 2 == 0 else variants[::-1]
        for name, migrate in in_turn:
            downtimes[name].append(migrate())

    warmup = 0 if benchmark.disabled else 1
    benchmark.pedantic(both, rounds=1 if benchmark.disabled else ROUNDS, iterations=1,
                       warmup_rounds=warmup)
    for seen in (*downtimes.values(), loaded):
        del seen[:warmup]  # cold caches and first process starts: not a round
    pool, threads = (statistics.median(downtimes[n]) for n in ("pool", "threads"))
    benchmark.extra_info.update(
        pool_downtime_ms=round(pool, 1), threads_downtime_ms=round(threads, 1),
        threads_over_pool=round(threads / pool, 3),
        faster="pool" if pool < threads else "threads",
        threads_loaded_ms=round(statistics.median(loaded), 1),
        pool_downtimes_ms=[round(d, 1) for d in downtimes["pool"]],
        threads_downtimes_ms=[round(d, 1) for d in downtimes["threads"]])
    results.setdefault("pool-vs-threads", {}).update(pool=pool, threads=threads)
