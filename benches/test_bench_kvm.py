"""Real KVM vCPUs, one VM per side: per side beside the physical limit, and end to end.

``test_vcpu_get_put_one_vm``: per side, the get (source) and the put (destination) of 288
and 512 vCPUs of one VM, with the native engine on 1 and T threads and the ctypes fallback
on 1 (:mod:`benches.one_vm`), and the C probe of the physical limit, interleaved round by
round so that the host's noise hits every variant alike. ``extra_info``: each variant's
median ms, ``native_T_over_1`` speed-ups, ``native_1_over_probe_1`` (how close to C one
thread is), ``ctypes_over_native_1``.

``test_migrate_288_one_vm``: ``devstate migrate`` of 288 vCPUs (one VM per side, both
sides on this host: migrate_locally), with the default ``vcpu_readback=digest`` and with
``before-commit``, and the sequential baseline (one worker, one device at a time, one
thread), each round beside the limit ``(C get 1 thread + C put 1 thread) / cores``
measured in the same round (the probe's median of 3 interleaved rounds); and the same
288 vCPUs as a *live* guest (``live``: executing the guest program until the stop, with
the smallest RAM that holds it for 288, 4 MiB, so that the figure is the vCPUs' and not
RAM's), its continuity checked; and that guest with a 1 s tick instead of the default 50 ms
(``live-1s-tick``): its 288 LAPIC timers a side fire ~20 times less often, which measures
what they cost the downtime. The probe's limit has no guest; each round also measures it
with both VMs' LAPIC timers ticking as each live variant's do (:func:`benches.one_vm.probe`
with ``tick_ms``), the limit for that guest. ``extra_info``: median downtimes, each over
the limit, and each live variant over the limit with its timers.

Every migration is digest-verified, every per-side variant checks what it moved. Run:
``python -m pytest benches/test_bench_kvm.py --benchmark-only``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from benches.one_vm import CPUS, OneVmSides, build_probe, interleaved_round, limit_ms, probe
from benches.verified import migrate_verified
from devstate.cli import kvm_usable
from devstate.config.params import MigrationParams, Readback, Schedule
from devstate.config.spec import parse_spec

USABLE, WHY = kvm_usable()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"needs KVM: {WHY}")
ROUNDS = 5
MIGRATIONS = {
    "devstate": MigrationParams(),
    "devstate-readback-before-commit": MigrationParams(vcpu_readback=Readback.BEFORE_COMMIT),
    "sequential": MigrationParams(workers=1, schedule=Schedule.SEQUENTIAL),
}


@pytest.fixture(scope="module")
def probe_binary(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The physical-limit probe, built once (None without gcc: the limit is then absent)."""
    return build_probe(str(tmp_path_factory.mktemp("probe")))


@pytest.fixture(params=[288, 512], ids=lambda n: f"{n}-vcpus")
def sides(request: pytest.FixtureRequest) -> Iterator[OneVmSides]:
    one = OneVmSides(request.param)
    try:
        yield one
    finally:
        one.close()


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(statistics.median(v), 2) for k, v in samples.items() if v}


def test_vcpu_get_put_one_vm(benchmark, sides: OneVmSides, probe_binary: Path | None) -> None:
    """Per side: get and put every vCPU of one VM, each variant and the C probe in turn."""
    benchmark.group = f"kvm-one-vm-{sides.count}"
    samples: dict[str, list[float]] = {}

    benchmark.pedantic(interleaved_round, args=(sides, probe_binary, samples), rounds=ROUNDS,
                       iterations=1)
    info = benchmark.extra_info
    medians = _medians(samples)
    info["median_ms"] = medians
    info["threads"] = len(CPUS)
    t = len(CPUS)
    for op in ("get", "put"):
        native_1 = medians.get(f"{op} native-1")
        if native_1:
            info[f"{op}_native_{t}_over_1"] = round(native_1 / medians[f"{op} native-{t}"], 3)
            info[f"{op}_ctypes_over_native_1"] = round(medians[f"{op} ctypes-1"] / native_1, 3)
            if f"{op} probe-1" in medians:
                info[f"{op}_native_1_over_probe_1"] = round(
                    native_1 / medians[f"{op} probe-1"], 3)


def test_migrate_288_one_vm(benchmark, probe_binary: Path | None) -> None:
    """End to end: devstate migrate of 288 vCPUs, beside the limit measured each round."""
    benchmark.group = "kvm-migrate-288"
    spec = parse_spec({"seed": 7, "vcpus": {"count": 288, "backend": "kvm"}})
    ticks = {"live": 50, "live-1s-tick": 1000}
    live = {tick: parse_spec({"seed": 7, "vcpus": {"count": 288, "backend": "kvm"},
                              "ram": {"size": "4MiB", "tick_ms": tick_ms}})
            for tick, tick_ms in ticks.items()}
    downtimes: dict[str, list[float]] = {}
    limits: list[float] = []
    # The limit for a live guest: the probe with both VMs' LAPIC timers ticking as the
    # guest's do (their interrupts slow the same ioctls; the plain limit has no guest).
    timed_limits: dict[str, list[float]] = {tick: [] for tick in ticks}

    def one_round() -> None:
        for name, params in MIGRATIONS.items():
            report = migrate_verified(spec, params)
            assert report.kvm is not None and report.kvm.vms_per_side == 1
            downtimes.setdefault(name, []).append(report.downtime_ms)
        for tick, spec_live in live.items():
            report = migrate_verified(spec_live, MIGRATIONS["devstate"])
            assert report.guest is not None and report.guest.vcpus_running == 288
            downtimes.setdefault(f"devstate-{tick}", []).append(report.downtime_ms)
        if probe_binary is not None:
            limits.append(limit_ms(probe(probe_binary, 288, rounds=3)))
            for tick, tick_ms in ticks.items():
                timed_limits[tick].append(limit_ms(probe(probe_binary, 288, rounds=3,
                                                         tick_ms=tick_ms)))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    info = benchmark.extra_info
    info["median_downtime_ms"] = _medians(downtimes)
    if limits:
        limit = statistics.median(limits)
        info["limit_ms"] = round(limit, 2)
        for name, values in downtimes.items():
            info[f"{name}_over_limit"] = _over(values, limits)
        info["limit_ms_with_the_guests_timers"] = _medians(timed_limits)
        for tick, timed in timed_limits.items():
            info[f"devstate-{tick}_over_limit_with_its_timers"] = _over(
                downtimes[f"devstate-{tick}"], timed)


def _over(downtimes: list[float], limits: list[float]) -> float:
    """The median of each round's downtime over that round's limit (both measured minutes
    apart at most)."""
    return round(statistics.median(d / lim for d, lim in zip(downtimes, limits, strict=True)), 3)
