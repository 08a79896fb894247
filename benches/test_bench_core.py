"""Core runtime overheads and the first sequential-vs-pool comparison.

Run: ``python -m pytest benches/test_bench_core.py --benchmark-only`` (CI runs every bench
once with ``--benchmark-disable`` so they keep working).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import uvloop

from benches.conftest import median_s
from benches.verified import migrate_verified
from devstate.arena.slots import Arena
from devstate.config.params import MigrationParams, Schedule
from devstate.config.spec import parse_spec
from devstate.devices import device_table
from devstate.worker import jobs as m
from devstate.worker.layout import arena_layout
from devstate.worker.pool import WorkerPool

COPY_BYTES = 64 << 20


@pytest.fixture(scope="module")
def arena_and_source():
    """A pre-faulted arena view and 64 MiB of source bytes."""
    source = np.random.default_rng(1).integers(0, 255, COPY_BYTES, dtype=np.uint8)
    with Arena.create(COPY_BYTES) as arena:
        yield arena.view(0, COPY_BYTES), source


def _array(view: memoryview) -> np.ndarray:
    # A fresh array per call, dropped at once, so the arena can always close.
    return np.frombuffer(view, dtype=np.uint8)


@pytest.mark.benchmark(group="arena-vs-memcpy")
def test_plain_memory_copy(benchmark, arena_and_source, results) -> None:
    _, source = arena_and_source
    target = np.empty_like(source)
    target[:] = 0  # warm: first touch would be measured otherwise
    benchmark(np.copyto, target, source)
    results.setdefault("copy", {})["plain"] = median_s(benchmark) or 0.0
    benchmark.extra_info["GB/s"] = _gbps(benchmark)


@pytest.mark.benchmark(group="arena-vs-memcpy")
def test_arena_write(benchmark, arena_and_source, results) -> None:
    view, source = arena_and_source
    benchmark(lambda: np.copyto(_array(view), source))
    _ratio(benchmark, results, "write")


@pytest.mark.benchmark(group="arena-vs-memcpy")
def test_arena_read(benchmark, arena_and_source, results) -> None:
    view, source = arena_and_source
    target = np.empty_like(source)
    target[:] = 0
    benchmark(lambda: np.copyto(target, _array(view)))
    _ratio(benchmark, results, "read")


def _gbps(benchmark) -> float | None:
    median = median_s(benchmark)
    return round(COPY_BYTES / median / 1e9, 2) if median else None


def _ratio(benchmark, results, name: str) -> None:
    median, plain = median_s(benchmark), results.get("copy", {}).get("plain")
    benchmark.extra_info["GB/s"] = _gbps(benchmark)
    if median and plain:
        benchmark.extra_info[f"arena_{name}_vs_plain_copy"] = round(plain / median, 3)


@pytest.mark.benchmark(group="dispatch")
def test_dispatch_round_trip(benchmark) -> None:
    """One request to a worker and its reply: the fixed cost a batch amortises."""
    spec = parse_spec({"vcpus": {"count": 2}})
    calls = 200

    async def scenario() -> float:
        table = device_table(spec)
        layout = arena_layout(MigrationParams(workers=1), table)
        async with WorkerPool(table, layout, name="bench") as pool:
            loop = asyncio.get_running_loop()
            start = loop.time()
            for _ in range(calls):
                await pool.call(0, m.Digests(()))
            return (loop.time() - start) / calls

    per_call = benchmark.pedantic(lambda: uvloop.run(scenario()), rounds=1, iterations=1)
    benchmark.extra_info["round_trip_us"] = round(per_call * 1e6, 1)


VCPUS_512 = parse_spec({"name": "vcpus-512", "vcpus": {"count": 512}})


def _free_vcpus(count: int):
    return parse_spec({"name": f"free-vcpus-{count}",
                       "vcpus": {"count": count, "get_us": 0, "put_us": 0}})


def _migrate(spec, params) -> float:
    """One verified migration; its downtime in ms (the digests are compared after the
    resume, outside it)."""
    return migrate_verified(spec, params).downtime_ms


@pytest.mark.benchmark(group="dispatch")
@pytest.mark.parametrize("count", [1, 512])
def test_per_item_overhead(benchmark, results, count: int) -> None:
    """vCPUs with zero simulated cost: the slope from 1 to 512 is what the runtime adds per
    item (get into a slot, packet, checksum, send, receive, verify, put), both sides."""
    downtimes: list[float] = []

    def once() -> None:
        downtimes.append(_migrate(_free_vcpus(count), MigrationParams(workers=1)))

    benchmark.pedantic(once, rounds=3, iterations=1)
    downtime = sorted(downtimes)[len(downtimes) // 2]
    benchmark.extra_info["downtime_ms"] = round(downtime, 2)
    seen = results.setdefault("per-item", {})
    seen[count] = downtime
    if 1 in seen and 512 in seen:
        benchmark.extra_info["per_item_us"] = round((seen[512] - seen[1]) * 1e3 / 511, 2)


@pytest.mark.benchmark(group="vcpus-512")
@pytest.mark.parametrize(("mode", "params"), [
    ("sequential", MigrationParams(workers=1, schedule=Schedule.SEQUENTIAL)),
    ("pool", MigrationParams(workers=2)),
])
def test_save_load_512_sim_vcpus(benchmark, results, mode: str, params: MigrationParams) -> None:
    downtime = benchmark.pedantic(_migrate, args=(VCPUS_512, params), rounds=3, iterations=1)
    # pedantic returns the last round's value: good enough beside the table's medians
    benchmark.extra_info["downtime_ms"] = round(downtime, 2)
    results.setdefault("vcpus-512", {})[mode] = downtime
    seen = results["vcpus-512"]
    if "sequential" in seen and "pool" in seen:
        benchmark.extra_info["sequential_over_pool"] = round(seen["sequential"] / seen["pool"], 3)
