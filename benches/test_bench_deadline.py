"""The deadline coordinator: the plan against spec order, and a limit that cannot be met.

The cost model's accuracy (expected against measured downtime, in-sample and on held-out
scenarios) is ``benches/test_bench_cost_model.py``.

The plan's transfer order comes from the cost model, so it is first calibrated the way a
host running devstate calibrates it: by earlier runs of the four scenarios of
``benches/scenarios/`` on this machine, into a fresh cost file (this host's own cache is
never read). Then on the mixed scenario (512 vCPUs and four devices of 32-512 MiB with
dependencies) the plan (longest tail first) runs against spec order, ABBA; with benchmarks
enabled the plan must beat spec order. Every migration is verified (digests compared after
the resume, outside the downtime).

Run: ``python -m pytest benches/test_bench_deadline.py --benchmark-only`` (about 1 min).
"""

from __future__ import annotations

import statistics

import pytest
import uvloop

from benches.conftest import median_s
from benches.cost_accuracy import calibrate, scenario
from benches.verified import migrate_verified
from devstate.config.params import MigrationParams
from devstate.errors import DowntimeLimitUnmet
from devstate.migration.source import SourceVM
from devstate.planning.cost import CostHistory

NAMES = ["vcpu-heavy", "one-huge-vfio", "many-small", "mixed"]
ROUNDS = 5
CALIBRATION_PASSES = 3


@pytest.fixture(scope="module")
def calibrated(request, tmp_path_factory) -> CostHistory:
    """This host's constants after earlier runs of every scenario, fixed from then on."""
    quick = request.config.getoption("benchmark_disable")
    history = CostHistory(tmp_path_factory.mktemp("costs") / "costs.json")
    # Quick mode (CI) learns from the one scenario it then runs, once.
    names = ["mixed"] if quick else NAMES
    calibrate(history, [scenario(n) for n in names], 1 if quick else CALIBRATION_PASSES)
    return CostHistory(history.path, learn=False)


@pytest.mark.benchmark(group="deadline")
def test_plan_beats_spec_order_on_mixed(benchmark, calibrated) -> None:
    spec = scenario("mixed").spec
    plan: list[float] = []
    order: list[float] = []

    def both() -> None:
        # Interleaved, and each first in turn (ABBA): the host's drift, and whatever a run
        # leaves warm for the next, hit both alike.
        runs = [(plan, MigrationParams()), (order, MigrationParams(spec_order=True))]
        for seen, params in runs if len(plan) % 2 == 0 else reversed(runs):
            seen.append(migrate_verified(spec, params, history=calibrated).downtime_ms)

    benchmark.pedantic(both, rounds=ROUNDS if not benchmark.disabled else 1, iterations=1)
    ratio = statistics.median(order) / statistics.median(plan)
    benchmark.extra_info.update(plan_ms=round(statistics.median(plan), 1),
                                spec_order_ms=round(statistics.median(order), 1),
                                spec_order_over_plan=round(ratio, 3))
    if median_s(benchmark) is not None:
        assert ratio > 1.0, f"the plan ({statistics.median(plan):.0f} ms) did not beat spec " \
                            f"order ({statistics.median(order):.0f} ms)"


def test_unmeetable_limit_never_switches_over() -> None:
    """One huge device (1.3 s on its own path) under a 500 ms limit: no stop, no
    destination contacted, the error names the device's own path as critical."""
    spec = scenario("one-huge-vfio").spec

    async def attempt() -> tuple[DowntimeLimitUnmet, bool]:
        from devstate.net.transport import parse_uri

        async with SourceVM(spec, MigrationParams(downtime_limit_ms=500)) as source:
            with pytest.raises(DowntimeLimitUnmet) as info:
                await source.migrate(parse_uri("unix:/nonexistent/never-contacted.sock"))
            return info.value, source.running

    error, running = uvloop.run(attempt())
    assert running
    assert "vfio/gpu0 alone" in error.critical_path and error.expected_ms > 1000
