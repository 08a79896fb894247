"""Live RAM: a guest that dirties its RAM migrates while it runs, precopy converging on the
downtime limit; and the cost model's estimate of such a stop on scenarios it was not
calibrated on.

One run covers 64 and 288 KVM vCPUs in 1 GiB of guest RAM, dirty rates 0 / low / high, and
a pool of 1 or 2 workers per side, interleaved in every round, in reverse order every other
round (the host's noise hits every variant alike). "0": the guest only writes its control
pages; "low": 100 pages/s per vCPU over a 1 MiB working set (25 MiB/s in all at 64 vCPUs,
112 MiB/s at 288); "high": 2000 pages/s per vCPU over 1 MiB (500 MiB/s at 64, 2.2 GiB/s
at 288 if the vCPUs got the cores to write that fast, which on 2 cores they do not: the
measured rate is in the figures).
Every round then finds the whole working set dirty again (64 or 288 MiB): what the stop
moves. The limit is 400 ms, not QEMU's default 300: 288 vCPUs dirtying "high" leave
289 MiB for the stop every round, an estimate of 260-300 ms on this host, so at 300 ms
a cost file that learned a slower host (a RAM weight of 1.15) rightly refuses to switch
over, and the bench fails for the host's noise. Every migration goes through
:func:`benches.verified.migrate_verified`: every RAM range's digest compared, the guest
must have continued.

``extra_info`` per variant (medians): the migration's wall time (``time.perf_counter``
around :func:`migrate_verified`: both sides' start-up, RAM pre-faulting and the digest
comparison included), precopy rounds, downtime, the estimate made before the stop and
measured / expected, MiB sent in all and with the guest stopped,
the guest's measured dirty rate (distinct pages the dirty log found per second of the last
round: bounded by the working set, whatever the rate asked).

The first bench's estimates are the cost model's defaults, nothing learned (a history that
does not learn): its RAM constants (``HostCosts.ram_bytes_per_s``,
``ram_fault_bytes_per_s``, ``ram_range_ms``) were fitted by least squares (relative
errors) to two runs of this bench's variants, the calibration set: the twelve above and
three of other RAM sizes (256 MiB, 512 MiB, 3 GiB). ``abs_error`` is the median and
largest |measured / expected - 1| over it.

The second bench measures the estimate on scenarios in none of those (:data:`HELD_OUT`:
other vCPU counts, RAM sizes, rates and working sets) the way :mod:`benches.cost_accuracy`
does for devices: a fresh cost file first learns from a pass over the calibration set (the
weights of the host's parts refitted to this host as it is during the run: on a shared
2-core host the same migration's downtime moves by a third between runs), then, its
constants fixed, estimates every held-out stop.

With benchmarks disabled (CI) each bench migrates one small case once (16 vCPUs, 64 MiB,
dirty low) and checks what it moved.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from benches.cost_accuracy import Accuracy, calibrate, measure, summary, table
from benches.cost_accuracy import Scenario as Migration
from benches.verified import migrate_verified
from devstate.config.params import MigrationParams
from devstate.config.spec import MachineConfig, parse_spec
from devstate.planning.cost import CostHistory
from devstate.report.migration import MigrationReport

ROUNDS = int(os.environ.get("DEVSTATE_BENCH_ROUNDS", "2"))
CALIBRATION_PASSES = 1
LIMIT_MS = 400.0
RATES = {"0": (0, None), "low": (100, "1MiB"), "high": (2000, "1MiB")}
MIB = 1 << 20
# name: (vCPUs, RAM, pages/s per vCPU, working set per vCPU, workers per side)
Scenario = tuple[int, str, int, str | None, int]
QUICK: dict[str, Scenario] = {"16 vCPUs, 64 MiB, dirty low, 2 workers":
                              (16, "64MiB", 100, "1MiB", 2)}
CALIBRATION: dict[str, Scenario] = {
    f"{vcpus} vCPUs, dirty {rate}, {workers} worker{'s' * (workers > 1)}":
    (vcpus, "1GiB", *RATES[rate], workers)
    for vcpus in (64, 288) for rate in RATES for workers in (1, 2)} | {
    # Other RAM sizes, so that the fit can tell the per-byte costs from the rest.
    "16 vCPUs, 256 MiB, 0, 2 workers": (16, "256MiB", 0, None, 2),
    "64 vCPUs, 512 MiB, 2000 pages/s over 1 MiB, 2 workers": (64, "512MiB", 2000, "1MiB", 2),
    "16 vCPUs, 3 GiB, 0, 1 worker": (16, "3GiB", 0, None, 1),
}
HELD_OUT: dict[str, Scenario] = {
    "128 vCPUs, 768 MiB, 500 pages/s over 1 MiB, 2 workers": (128, "768MiB", 500, "1MiB", 2),
    "200 vCPUs, 1 GiB, 1000 pages/s over 512 KiB, 2 workers": (200, "1GiB", 1000, "512KiB", 2),
    "32 vCPUs, 2 GiB, 200 pages/s over 2 MiB, 1 worker": (32, "2GiB", 200, "2MiB", 1),
    "96 vCPUs, 1536 MiB, 0, 2 workers": (96, "1536MiB", 0, None, 2),
}


def _spec(vcpus: int, ram: str, pages: int, working_set: str | None) -> MachineConfig:
    table: dict[str, object] = {"size": ram, "dirty_rate": pages}
    if working_set is not None:
        table["working_set"] = working_set
    return parse_spec({"seed": vcpus, "vcpus": {"count": vcpus, "backend": "kvm"},
                       "ram": table})


def _migrate_each(benchmark, scenarios: dict[str, Scenario]) -> dict[str, dict[str, float]]:
    """Every scenario once a round (CI's quick mode: the small one, once), each through
    :func:`migrate_verified` with the limit and the defaults' estimate; the medians."""
    if benchmark.disabled:
        scenarios = QUICK
    history = CostHistory(Path(tempfile.mkdtemp(prefix="devstate-bench-")) / "costs.json",
                          learn=False)
    specs = {name: (_spec(*s[:4]), s[4]) for name, s in scenarios.items()}
    seen: dict[str, list[tuple[MigrationReport, float]]] = {name: [] for name in specs}

    rounds_done = 0

    def one_round() -> None:
        nonlocal rounds_done
        order = list(specs) if rounds_done % 2 == 0 else list(reversed(specs))
        rounds_done += 1
        for name in order:
            spec, workers = specs[name]
            params = MigrationParams(workers=workers, downtime_limit_ms=LIMIT_MS)
            start = time.perf_counter()
            report = migrate_verified(spec, params, dest_params=MigrationParams(
                workers=workers), history=history)
            took = time.perf_counter() - start
            assert report.ram is not None and report.ram.rounds >= 2, report.ram
            assert report.guest is not None, name  # continued: migrate_verified asserts it
            assert report.guest.vcpus_running == spec.vcpus.count, report.guest.describe()
            seen[name].append((report, took))

    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else ROUNDS, iterations=1)
    figures = {}
    for name, runs in seen.items():
        reports = [r for r, _ in runs]
        rams = [r.ram for r in reports if r.ram is not None]
        downtime = statistics.median(r.downtime_ms for r in reports)
        expected = statistics.median(r.expected_ms for r in reports)
        figures[name] = {
            "wall_s": round(statistics.median(t for _, t in runs), 2),
            "rounds": statistics.median(r.rounds for r in rams),
            "downtime_ms": round(downtime, 1),
            "expected_ms": round(expected, 1),
            "measured_over_expected": round(downtime / expected, 3),
            "sent_mib": round(statistics.median(r.transferred_bytes for r in rams) / MIB, 1),
            "stopped_mib": round(statistics.median(r.stop_copy_bytes for r in rams) / MIB, 2),
            "dirty_pages_per_s": round(statistics.median(r.dirty_rate for r in rams)),
            "overrun_ms": round(max(r.overrun_ms for r in reports), 1),
            "ram_mib": specs[name][0].ram.size // MIB,  # type: ignore[union-attr]
        }
    return figures


def _abs_error(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    errors = [abs(v["measured_over_expected"] - 1) for v in figures.values()]
    return {"median": round(statistics.median(errors), 3), "max": round(max(errors), 3)}


def test_live_ram_rounds_downtime_and_estimate(benchmark) -> None:
    """The calibration set: 64 / 288 vCPUs, 1 GiB, dirty 0 / low / high, 1 / 2 workers;
    and 256 MiB, 512 MiB, 3 GiB."""
    benchmark.group = "live-ram"
    figures = _migrate_each(benchmark, CALIBRATION)
    benchmark.extra_info["variants"] = figures
    benchmark.extra_info["abs_error"] = _abs_error(figures)


def test_live_ram_estimate_held_out(benchmark, tmp_path: Path) -> None:
    """The estimate on scenarios it was not calibrated on: a fresh cost file learns from a
    pass over the calibration set (as a host running devstate learns from its earlier
    migrations), then, its constants fixed, estimates every held-out stop."""
    benchmark.group = "live-ram-held-out"
    quick = benchmark.disabled
    history = CostHistory(tmp_path / "costs.json")
    rows: list[Accuracy] = []

    def run() -> None:
        calibrate(history, _scenarios(QUICK if quick else CALIBRATION), CALIBRATION_PASSES)
        rows[:] = measure(history, _scenarios(QUICK if quick else HELD_OUT),
                          1 if quick else ROUNDS)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["held-out"] = {r.name: r.to_json() for r in rows} | summary(rows)
    benchmark.extra_info["constants"] = history.load().to_json()
    print("\n" + table({"held-out": rows}))


def _scenarios(scenarios: dict[str, Scenario]) -> list[Migration]:
    """The scenarios as the cost-accuracy helpers take them: the limit on the source, the
    same pool size on both sides."""
    return [Migration(name, _spec(*s[:4]),
                      MigrationParams(workers=s[4], downtime_limit_ms=LIMIT_MS),
                      MigrationParams(workers=s[4]))
            for name, s in scenarios.items()]
