"""Two real processes migrate a machine: bit-exact, in order, concurrent, and failing safely."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from devstate.cli import load_default_machine
from devstate.config.params import MigrationParams, Schedule
from devstate.config.spec import MachineConfig, parse_spec
from devstate.devices import device_table
from devstate.errors import MigrationFailed, WorkerLost
from devstate.migration.local import destination, migrate_locally
from devstate.migration.source import SourceVM


def _vfio(*devices: dict[str, Any], vcpus: int = 0, seed: int = 5) -> MachineConfig:
    return parse_spec({"seed": seed, "vcpus": {"count": vcpus}, "devices": list(devices)})


def test_default_machine_round_trips_bit_exact(run) -> None:
    spec = load_default_machine()
    report = run(migrate_locally(spec, MigrationParams(workers=2)))
    assert report.verified
    assert len(report.devices) == 3 + 512 + 8 + 4  # VM-level, vCPUs, RAM ranges, VFIO
    assert report.guest is not None and report.guest.continued, report.guest
    assert all(d.verified for d in report.devices)
    sizes = {d.id: d.size for d in device_table(spec) if d.vfio}
    moved = {d.id: d.bytes for d in report.devices if d.id in sizes}
    # A stream carries the device's own framing around its state: never less than the state.
    assert all(moved[i] >= sizes[i] for i in sizes)
    assert report.downtime_ms > 0


def test_four_streams_load_concurrently_and_in_order(run) -> None:
    spec = _vfio(*({"name": f"nic{i}", "size": "16MiB", "firmware_latency_ms": 200}
                   for i in range(4)), vcpus=8)
    report = run(migrate_locally(spec, MigrationParams(workers=2)))
    assert report.verified  # every byte arrived, in order: the digests match
    streams = [d for d in report.devices if d.id.startswith("vfio/")]
    # All four were loading at once: each started before any finished.
    assert max(d.load_start_ms for d in streams) < min(d.load_done_ms for d in streams)
    assert {d.dest_worker for d in streams} == {0, 1}
    # The downtime ends when the destination's workers resumed (after every device
    # completed its load, firmware included), which RESUMED's arrival follows.
    assert report.resumed_seen_ms is not None
    done = max(d.load_done_ms for d in report.devices)
    assert done < report.downtime_ms <= report.resumed_seen_ms


def test_sequential_mode_loads_one_device_after_another(run) -> None:
    spec = _vfio(*({"name": f"nic{i}", "size": "4MiB", "firmware_latency_ms": 50}
                   for i in range(3)))
    report = run(migrate_locally(spec, MigrationParams(workers=1, schedule=Schedule.SEQUENTIAL)))
    assert report.verified
    loads = sorted(report.devices, key=lambda d: d.load_start_ms)
    for before, after in zip(loads, loads[1:], strict=False):
        assert before.load_done_ms <= after.load_start_ms
    assert report.downtime_ms >= 150


async def _migrate_with_fault(spec: MachineConfig, fault, *, delay_s: float) -> dict[str, Any]:
    """Migrate while ``fault(source, dest_pid)`` strikes ``delay_s`` after the VM stops."""
    outcome: dict[str, Any] = {}
    async with SourceVM(spec, MigrationParams(workers=2)) as source, \
            destination(spec, MigrationParams(workers=2)) as dest:
        before = await source.digests()
        loop = asyncio.get_running_loop()

        def on_status(status: str) -> None:
            if status == "device":
                loop.call_later(delay_s, lambda: outcome.setdefault(
                    "struck", (fault(source, dest.pid), time.monotonic())))

        with pytest.raises(MigrationFailed) as info:
            await source.migrate(dest.address, on_status=on_status)
        outcome["failed_at"] = time.monotonic()
        outcome["error"] = info.value
        outcome["running"] = source.running
        if source.running:
            outcome["unchanged"] = await source.digests() == before
    return outcome


# Slow enough that the fault lands mid-transfer: 256 MiB read at 256 MiB/s takes ~1 s.
_BIG = {"name": "big", "size": "256MiB", "read_bandwidth": "256MiB/s",
        "write_bandwidth": "256MiB/s"}


def test_worker_killed_mid_save_is_worker_lost_within_a_second(run) -> None:
    spec = _vfio(_BIG, {"name": "small", "size": "8MiB"}, vcpus=16)
    big = next(d.index for d in device_table(spec) if d.id == "vfio/big")

    def kill_owner(source: SourceVM, _: int) -> int:
        pid = source.pool.pids[source.plan.owner[big]]
        os.kill(pid, signal.SIGKILL)
        return pid

    outcome = run(_migrate_with_fault(spec, kill_owner, delay_s=0.3))
    error = outcome["error"]
    assert isinstance(error.__cause__, WorkerLost)
    assert error.__cause__.exitcode == -signal.SIGKILL
    assert outcome["failed_at"] - outcome["struck"][1] < 1.0
    assert not outcome["running"]  # the lost worker's devices went with it


def test_device_model_killed_mid_load_fails_and_source_resumes(run) -> None:
    spec = _vfio(_BIG, {"name": "small", "size": "8MiB"}, vcpus=16)

    def kill_dest_model(_: SourceVM, dest_pid: int) -> int:
        models = [p for p in psutil.Process(dest_pid).children(recursive=True)
                  if "vfio.model" in " ".join(p.cmdline()) and "big" in " ".join(p.cmdline())]
        assert len(models) == 1, [p.cmdline() for p in models]
        models[0].kill()
        return models[0].pid

    outcome = run(_migrate_with_fault(spec, kill_dest_model, delay_s=0.5))
    assert "source resumed" in str(outcome["error"])
    assert "vfio/big" in str(outcome["error"])
    assert outcome["running"]
    assert outcome["unchanged"]


def test_destination_refuses_an_incompatible_machine(run) -> None:
    ours = _vfio({"name": "nic0", "size": "4MiB"}, vcpus=4)
    theirs = _vfio({"name": "nic0", "size": "8MiB"}, vcpus=4)

    async def scenario() -> tuple[MigrationFailed, bool, bool]:
        async with SourceVM(ours, MigrationParams(workers=2)) as source, \
                destination(theirs, MigrationParams(workers=2)) as dest:
            before = await source.digests()
            with pytest.raises(MigrationFailed) as info:
                await source.migrate(dest.address)
            return info.value, source.running, await source.digests() == before

    error, running, unchanged = run(scenario())
    assert "device 4" in str(error) and "4194304" in str(error) and "8388608" in str(error)
    assert running and unchanged


def test_a_local_destination_shares_the_session_not_the_process_group(run) -> None:
    """Its own group, so that a terminal's Ctrl-C reaches only the source; the source's
    session (and so its scheduler autogroup), so that both sides' threads share the CPUs
    thread by thread during the stop-and-copy."""

    async def scenario() -> tuple[int, int, int, str | None]:
        async with destination(_vfio({"name": "nic0", "size": "1MiB"}),
                               MigrationParams(workers=1)) as dest:
            group = Path(f"/proc/{dest.pid}/autogroup")
            found = dest.pid, os.getsid(dest.pid), os.getpgid(dest.pid), \
                group.read_text() if group.exists() else None
            os.kill(dest.pid, signal.SIGTERM)  # no migration comes: end it
            return found

    pid, session, group, autogroup = run(scenario())
    assert session == os.getsid(0)
    assert group != os.getpgid(0)
    assert group == pid  # the leader of a group of its own
    if autogroup is not None:  # a kernel with autogroup scheduling
        assert autogroup == Path("/proc/self/autogroup").read_text()


async def _migrate_refused(spec: MachineConfig, source_fault: str) -> tuple[str, bool, bool]:
    """Migrate with ``source_fault`` armed on the source; the error the migration failed
    with, whether the source runs, and whether its digests are as before."""
    async with SourceVM(spec, MigrationParams(workers=2, fault=source_fault)) as source, \
            destination(spec, MigrationParams(workers=2)) as dest:
        before = await source.digests()
        with pytest.raises(MigrationFailed) as info:
            await source.migrate(dest.address, compare_digests=True)
        return str(info.value), source.running, await source.digests() == before


def test_an_end_digest_that_disagrees_with_valid_packets_fails_the_load(run) -> None:
    """The source seals one stream's END with a wrong digest: every packet, its checksum
    and the END's byte and packet counts are right, so only the END digest check can
    refuse it. The destination must, naming the device, before COMMIT."""
    spec = _vfio({"name": "nic0", "size": "4MiB"}, vcpus=4)
    error, running, unchanged = run(_migrate_refused(spec, "end:corrupt"))
    assert "end.digest: vfio/nic0: state digest mismatch" in error, error
    assert "after commit" not in error
    assert running and unchanged


def test_a_stream_its_device_refuses_at_the_firmware_step_fails_before_commit(run) -> None:
    """The source's stream is wrong from its first chunk on, with every packet checksum
    and the END digest valid: only the destination device's own validation, which runs
    when its load completes (RESUMING -> STOP, where the firmware works), can see it. That
    step belongs to the load: the migration fails before COMMIT and the source resumes
    unchanged; a firmware step moved after LOADED (into the resume, say) would fail only
    after COMMIT, with the destination already told to run."""
    spec = _vfio({"name": "nic0", "size": "4MiB", "firmware_latency_ms": 20}, vcpus=4)
    error, running, unchanged = run(_migrate_refused(spec, "get:corrupt"))
    assert "vfio/nic0" in error and "differs from the device's content" in error, error
    assert "after commit" not in error
    assert running and unchanged
