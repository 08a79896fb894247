"""Real KVM vCPUs: a whole local migration of 512 and 1024 vCPUs, three ways.

Both sides run on this host and share its cores, so this measures the downtime a migration
between two processes sees, not what one side costs alone: the per-side get and put of
every vCPU, sequential, threaded, through a plain ProcessPoolExecutor and through
devstate's pool, are in ``benches/test_bench_vcpus.py``.

``extra_info`` carries each mode's median ``downtime_ms`` and, on the sharded run, the
other modes' downtimes over it. Run:
``python -m pytest benches/test_bench_kvm.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import uvloop

from devstate.cli import kvm_usable
from devstate.config.params import MigrationParams, Schedule
from devstate.config.spec import parse_spec

USABLE, WHY = kvm_usable()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"needs KVM: {WHY}")
COUNTS = (512, 1024)
THREADS = 2


MODES = {
    "sequential": MigrationParams(workers=1, schedule=Schedule.SEQUENTIAL),
    "single-vm": MigrationParams(workers=1, single_vm=True),
    "sharded": MigrationParams(workers=THREADS),
}


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("mode", list(MODES))
def test_migrate_kvm_vcpus(benchmark, results, count: int, mode: str) -> None:
    """Save+load between two processes: the downtime of each variant (both sides share
    this host's two cores, so this is not a per-side figure of test_bench_vcpus.py)."""
    from devstate.migration.local import migrate_locally

    benchmark.group = f"kvm-migrate-{count}"
    spec = parse_spec({"seed": 7, "vcpus": {"count": count, "backend": "kvm"}})
    downtimes: list[float] = []

    def once() -> None:
        report = uvloop.run(migrate_locally(spec, MODES[mode], compare_digests=False))
        downtimes.append(report.downtime_ms)

    benchmark.pedantic(once, rounds=3, iterations=1)
    downtime = sorted(downtimes)[len(downtimes) // 2]
    benchmark.extra_info["downtime_ms"] = round(downtime, 1)
    seen = results.setdefault(f"kvm-migrate-{count}", {})
    seen[mode] = downtime
    if mode == "sharded" and {"sequential", "single-vm"} <= seen.keys():
        benchmark.extra_info["sequential_over_sharded"] = round(seen["sequential"] / downtime, 3)
        benchmark.extra_info["single_vm_over_sharded"] = round(seen["single-vm"] / downtime, 3)
