"""The downtime limit: the cost model's estimate and its critical path, learning from runs,
no switchover when the limit cannot be met, and finishing or aborting past it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devstate.cli import kvm_usable
from devstate.config.params import MigrationParams, Overrun
from devstate.config.spec import parse_spec
from devstate.devices import device_table
from devstate.errors import DowntimeLimitUnmet, DowntimeOverrun
from devstate.migration.local import destination
from devstate.migration.source import SourceVM
from devstate.net.transport import parse_uri
from devstate.planning.cost import CostHistory, HostCosts, estimate, refine
from devstate.planning.plan import make_plan
from tests.kvm_access import needs_kvm

HUGE = parse_spec({"seed": 2, "vcpus": {"count": 4},
                   "devices": [{"name": "gpu", "size": "96MiB", "write_bandwidth": "128MiB/s",
                                "firmware_latency_ms": 100}]})


def test_one_devices_own_path_is_the_critical_path() -> None:
    made = estimate(device_table(HUGE), make_plan(device_table(HUGE), 2), HostCosts())
    # 96 MiB at 128 MiB/s is 750 ms, plus 100 ms of firmware, plus the fixed cost.
    assert made.critical.kind == "device" and "vfio/gpu alone" in made.critical.what
    assert made.expected_ms == pytest.approx(850 + HostCosts().fixed_ms)
    assert "vfio/gpu alone" in made.explain()


def test_many_records_make_the_host_critical() -> None:
    spec = parse_spec({"vcpus": {"count": 1024, "get_us": 200, "put_us": 200}})
    table = device_table(spec)
    made = estimate(table, make_plan(table, 2), HostCosts(cores=2, record_overhead_us=0))
    assert made.critical.kind == "host"
    assert made.expected_ms == pytest.approx(1024 * 400 / 1e3 / 2 + HostCosts().fixed_ms)


def test_refine_fits_the_host_weights_to_earlier_runs() -> None:
    """Runs that took 1.5x their copies and 2x their records teach exactly that."""
    host = HostCosts()
    for size, count in ((64, 0), (0, 1024), (128, 768), (32, 512), (256, 256)):
        spec = parse_spec({"vcpus": {"count": count},
                           "devices": [{"name": "d", "size": f"{size}MiB",
                                        "read_bandwidth": "64GiB/s",
                                        "write_bandwidth": "64GiB/s"}] if size else []})
        made = estimate(device_table(spec), make_plan(device_table(spec), 2), host)
        copies, records, sessions, ram, firmware = made.host_parts
        assert ram == 0
        actual = host.fixed_ms + 1.5 * copies + 2.0 * records + sessions + firmware
        host = refine(host, made, actual)
    assert host.weights[0] == pytest.approx(1.5, rel=0.02)
    assert host.weights[1] == pytest.approx(2.0, rel=0.02)


@needs_kvm
def test_guest_ram_is_learned_apart_from_vfio_copies() -> None:
    """A live guest's RAM is a part of its own: runs whose RAM took 3x its part and whose
    VFIO copies took 1.5x theirs teach both, each apart (the RAM's ranges are no VFIO
    sessions, nor do they cross at VFIO's rate)."""
    host = HostCosts(record_overhead_us=0)
    for ram, size, left in ((64, 0, 32), (256, 64, 0), (128, 32, 64), (512, 128, 128),
                            (32, 256, 16), (256, 0, 200)):
        spec = parse_spec({"vcpus": {"count": 1, "backend": "kvm"},
                           "ram": {"size": f"{ram}MiB"},
                           "devices": [{"name": "d", "size": f"{size}MiB",
                                        "read_bandwidth": "64GiB/s",
                                        "write_bandwidth": "64GiB/s"}] if size else []})
        table = device_table(spec)
        ranges = {d.index: d.size for d in table if d.ram is not None}
        made = estimate(table, make_plan(table, 2), host, (0.0, 0.0),
                        {i: min(n, left << 20) for i, n in ranges.items()})
        copies, records, sessions, ram_ms, firmware = made.host_parts
        assert ram_ms > 0 and sessions == (host.stream_overhead_ms if size else 0)
        actual = host.fixed_ms + 1.5 * copies + records + sessions + 3.0 * ram_ms + firmware
        host = refine(host, made, actual)
    assert host.weights[0] == pytest.approx(1.5, rel=0.02)
    assert host.weights[3] == pytest.approx(3.0, rel=0.02)


@needs_kvm
def test_ram_never_sent_before_costs_its_faults_too() -> None:
    """Of a range's bytes left for the stop, those the destination never received land in
    holes there: the RAM part counts them again at the fault rate, the rest not."""
    spec = parse_spec({"vcpus": {"count": 1, "backend": "kvm"}, "ram": {"size": "64MiB"}})
    table = device_table(spec)
    ranges = [d.index for d in table if d.ram is not None]
    host = HostCosts(ram_bytes_per_s=1e9, ram_fault_bytes_per_s=0.5e9, ram_range_ms=0.0)
    plan = make_plan(table, 2)
    left = {i: 10**7 for i in ranges}
    warm = estimate(table, plan, host, (0.0, 0.0), left).host_parts[3]
    cold = estimate(table, plan, host, (0.0, 0.0), left, {ranges[0]: 10**7}).host_parts[3]
    assert warm == pytest.approx(2 * 10.0) and cold == pytest.approx(warm + 20.0)


@needs_kvm
def test_one_range_at_a_time_crosses_at_its_own_channels_share_of_the_cap() -> None:
    """Sequential (one device after another): each RAM range rides its owner's channel
    alone, at that channel's share of a bandwidth cap, not at the whole cap; its bytes
    never sent before add their faults once."""
    spec = parse_spec({"vcpus": {"count": 1, "backend": "kvm"}, "ram": {"size": "64MiB"}})
    table = device_table(spec)
    ranges = [d.index for d in table if d.ram is not None]
    host = HostCosts(ram_bytes_per_s=1e9, ram_fault_bytes_per_s=0.5e9, ram_range_ms=0.0,
                     record_overhead_us=0.0, fixed_ms=0.0)
    capped = host.capped(MigrationParams(workers=1, channels=2,
                                         bandwidth_limit=2e8, cap_stop_copy=True))
    plan = make_plan(table, 1)
    left = {i: 10**7 for i in ranges}
    made = estimate(table, plan, capped, (0.0, 0.0), left, {ranges[0]: 10**7},
                    sequential=True)
    # Two ranges of 10 MB at 1e8 B/s (half of 2e8: two channels), then 10 MB of faults.
    assert made.expected_ms == pytest.approx(2 * 100.0 + 20.0)


def test_a_disturbed_run_teaches_nothing() -> None:
    made = estimate(device_table(HUGE), make_plan(device_table(HUGE), 2), HostCosts())
    assert refine(HostCosts(), made, made.expected_ms * 10) == HostCosts()


def test_history_survives_a_round_trip_and_a_corrupt_file(tmp_path: Path) -> None:
    history = CostHistory(tmp_path / "costs.json")
    learned = HostCosts(weights=(1.2, 0.9, 1.1, 1.3), runs=((1.0, 2.0, 3.0, 0.5, 0.0, 7.0),),
                        scale={"device": 1.1})
    history.save(learned)
    loaded = history.load()
    assert (loaded.weights, loaded.runs, loaded.scale) == (learned.weights, learned.runs,
                                                           learned.scale)
    history.path.write_text("{not json")
    assert history.load().weights == HostCosts().weights


def test_unmeetable_limit_never_stops_the_vm(run) -> None:
    async def scenario() -> tuple[DowntimeLimitUnmet, bool, bool, list[str]]:
        seen: list[str] = []
        async with SourceVM(HUGE, MigrationParams(downtime_limit_ms=300)) as source:
            before = await source.digests()
            with pytest.raises(DowntimeLimitUnmet) as info:
                await source.migrate(parse_uri("unix:/nonexistent/never.sock"),
                                     on_status=seen.append)
            return info.value, source.running, await source.digests() == before, seen

    error, running, unchanged, seen = run(scenario())
    assert running and unchanged
    assert "vfio/gpu alone" in error.critical_path and "no switchover" in str(error)
    assert seen == ["setup", "active", "failed"]


async def _past_the_limit(overrun: Overrun) -> dict[str, Any]:
    params = MigrationParams(downtime_limit_ms=250, force_switchover=True, overrun=overrun)
    seen: list[str] = []
    async with SourceVM(HUGE, params) as source, destination(HUGE, MigrationParams()) as dest:
        before = await source.digests()
        try:
            report = await source.migrate(dest.address, compare_digests=True,
                                          on_status=seen.append)
        except DowntimeOverrun as exc:
            return {"error": exc, "running": source.running, "seen": seen,
                    "unchanged": await source.digests() == before}
        return {"report": report, "seen": seen}


def test_abort_past_the_limit_resumes_the_source_unchanged(run) -> None:
    outcome = run(_past_the_limit(Overrun.ABORT))
    assert "passed the downtime limit of 250 ms" in str(outcome["error"])
    assert "vfio/gpu alone" in str(outcome["error"])
    assert outcome["running"] and outcome["unchanged"]
    assert outcome["seen"] == ["setup", "active", "device", "cancelling", "cancelled"]


def test_finish_past_the_limit_reports_the_overrun_and_its_cause(run) -> None:
    outcome = run(_past_the_limit(Overrun.FINISH))
    report = outcome["report"]
    assert report.verified and report.overrun_ms > 0
    assert "vfio/gpu alone" in report.critical_path
    assert outcome["seen"] == ["setup", "active", "device", "completed"]


@pytest.mark.skipif(not kvm_usable()[0], reason=f"needs KVM: {kvm_usable()[1]}")
def test_kvm_record_costs_are_probed_without_changing_the_vcpus(run) -> None:
    spec = parse_spec({"seed": 5, "vcpus": {"count": 64, "backend": "kvm"}})

    async def scenario() -> tuple[tuple[float, float], bool]:
        async with SourceVM(spec, MigrationParams()) as source:
            before = await source.digests()
            costs = await source.outgoing.deadline.probe_records()
            return costs, await source.digests() == before

    (get_us, put_us), unchanged = run(scenario())
    assert unchanged
    assert 5 < get_us < 5000 and 5 < put_us < 20000


def _precopy_machine(dirty: str | None) -> Any:
    device = {"name": "nic", "size": "48MiB", "read_bandwidth": "256MiB/s",
              "write_bandwidth": "256MiB/s", "precopy": True}
    if dirty:
        device["dirty_rate"] = dirty
    return parse_spec({"seed": 6, "vcpus": {"count": 8}, "devices": [device]})


async def _migrate_with(spec: Any, params: MigrationParams) -> dict[str, Any]:
    seen: list[str] = []
    async with SourceVM(spec, params) as source, destination(spec, MigrationParams()) as dest:
        try:
            report = await source.migrate(dest.address, compare_digests=True,
                                          on_status=seen.append)
        except DowntimeLimitUnmet as exc:
            return {"error": exc, "running": source.running, "seen": seen}
        return {"report": report, "seen": seen}


def test_precopy_moves_the_stream_while_the_vm_runs(run) -> None:
    """Without a limit, precopy switches over once the device is down to one chunk: most
    of its bytes were loaded before the stop, and re-sent dirty chunks arrive too."""
    outcome = run(_migrate_with(_precopy_machine("16MiB/s"), MigrationParams(precopy=True)))
    report = outcome["report"]
    nic = next(d for d in report.devices if d.id == "vfio/nic")
    assert report.verified  # the destination has the source's state as of the stop
    assert nic.load_start_ms < -50  # loading began well before the stop
    assert nic.bytes > 48 << 20  # and chunks dirtied behind the initial pass came again
    # What was left for stop-and-copy is about a chunk, not 48 MiB at 256 MiB/s (188 ms).
    assert report.expected_ms < 60


def test_precopy_switches_over_once_the_limit_is_expected_to_hold(run) -> None:
    outcome = run(_migrate_with(_precopy_machine(None),
                                MigrationParams(precopy=True, downtime_limit_ms=80)))
    report = outcome["report"]
    assert report.verified and report.expected_ms <= 80
    assert outcome["seen"] == ["setup", "active", "device", "completed"]


@pytest.mark.slow  # a precopy timeout
def test_precopy_that_cannot_converge_fails_without_stopping_the_vm(run) -> None:
    """Dirtied faster (512 MiB/s) than it can be read (256 MiB/s): the expected downtime
    never meets 30 ms, so after the precopy bound no switchover happens, the error shows
    what is still to send, and the source runs on."""
    params = MigrationParams(precopy=True, downtime_limit_ms=30, precopy_timeout_s=1.0)
    outcome = run(_migrate_with(_precopy_machine("512MiB/s"), params))
    error = outcome["error"]
    assert outcome["running"]
    assert "vfio/nic alone" in error.critical_path and "of precopy" in error.critical_path
    assert outcome["seen"] == ["setup", "active", "failed"]


DEPENDENT: dict[str, Any] = {"seed": 3, "vcpus": {"count": 32, "after": ["vfio/b"]},
             "devices": [{"name": "a", "size": "8MiB", "firmware_latency_ms": 20,
                          "after": ["vfio/b"]},
                         {"name": "b", "size": "8MiB", "firmware_latency_ms": 300,
                          "priority": 0}]}


def test_dependencies_are_validated() -> None:
    from devstate.errors import SpecError

    cases = [({"after": ["vfio/nope"]}, "devices[0].after", "not a device"),
             ({"after": ["vfio/a"]}, "devices[0].after", "itself"),
             ({"after": ["vfio/b"]}, "devices", "dependency cycle")]
    for extra, field, words in cases:
        devices = [{"name": "a", "size": "1MiB", **extra},
                   {"name": "b", "size": "1MiB", "after": ["vfio/a"]}]
        if words != "dependency cycle":
            devices[1].pop("after")
        with pytest.raises(SpecError) as info:
            parse_spec({"devices": devices})
        assert info.value.path.startswith(field) and words in str(info.value)
    with pytest.raises(SpecError, match="vCPU"):
        parse_spec({"vcpus": {"count": 2, "after": ["cpu/1"]}})


def test_the_estimate_follows_dependency_chains() -> None:
    spec = parse_spec(DEPENDENT)
    made = estimate(device_table(spec), make_plan(device_table(spec), 2), HostCosts())
    # vfio/a's 20 ms of firmware start only once vfio/b's 300 ms are done.
    assert made.critical.what == "vfio/a after vfio/b"
    assert made.critical.ms == pytest.approx(8 / 512 * 1e3 + 300 + 20)


@pytest.mark.slow  # migrations at three worker counts
def test_devices_complete_their_loads_after_what_they_depend_on(run) -> None:
    """vfio/a and every vCPU load after vfio/b (300 ms of firmware), on whichever
    destination worker each lands: across workers the LOADED notes order them."""
    spec = parse_spec(DEPENDENT)
    for workers in (2, 3):
        report = run(_migrate_with(spec, MigrationParams(workers=workers)))["report"]
        rows = {d.id: d for d in report.devices}
        b = rows["vfio/b"]
        assert report.verified
        assert rows["vfio/a"].load_done_ms >= b.load_done_ms + 20
        cpus = [d for d in report.devices if d.id.startswith("cpu/")]
        assert min(d.load_done_ms for d in cpus) >= b.load_done_ms
        assert {d.dest_worker for d in cpus} != {b.dest_worker}  # some wait across workers


def test_a_sequential_estimate_is_the_sum_and_teaches_nothing() -> None:
    spec = parse_spec({"vcpus": {"count": 100, "get_us": 10, "put_us": 10},
                       "devices": [{"name": n, "size": "64MiB", "read_bandwidth": "64GiB/s",
                                    "write_bandwidth": "128MiB/s", "firmware_latency_ms": 50}
                                   for n in ("a", "b")]})
    host = HostCosts(record_overhead_us=0)
    made = estimate(device_table(spec), make_plan(device_table(spec), 1), host, sequential=True)
    # Each stream: 500 ms of bytes, 50 ms of firmware, its session; 100 records of 20 µs.
    assert made.expected_ms == pytest.approx(
        host.fixed_ms + 2 * (500 + 50 + host.stream_overhead_ms) + 2.0)
    assert made.critical.kind == "sequential"
    assert refine(host, made, made.expected_ms * 1.5) == host
