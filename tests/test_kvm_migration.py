"""Real KVM vCPUs migrate between two processes, every one verified: one KVM VM per side,
owned by worker 0 (as a guest's vCPUs are), got and put by its engine on the owner's threads;
the sharded experiment (a VM per worker) still works, labelled as such."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from devstate.cli import kvm_usable
from devstate.config.params import MigrationParams, Readback, Routing, Schedule
from devstate.config.spec import parse_spec
from devstate.devices import device_table
from devstate.errors import MigrationFailed
from devstate.migration.local import migrate_locally
from devstate.net.transport import parse_uri
from devstate.report.migration import format_table
from tests.faulty_proxy import Proxy, faulty_proxy

USABLE, WHY = kvm_usable()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"needs KVM: {WHY}")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow  # 1024 KVM vCPUs
def test_1024_kvm_vcpus_migrate_verified_with_the_example_spec() -> None:
    done = subprocess.run([sys.executable, "-m", "devstate", "migrate", "--spec",
                           str(EXAMPLES / "kvm-1024.toml"), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    cpus = [d for d in report["devices"] if d["id"].startswith("cpu/")]
    assert len(cpus) == 1024
    assert sorted(d["id"] for d in report["devices"] if d["id"].startswith("vm/")) == [
        "vm/clock", "vm/irqchip", "vm/pit"]
    assert report["verified"] and all(d["verified"] for d in report["devices"])
    assert {d["source_worker"] for d in cpus} == {0}  # one VM, one owner
    assert report["kvm"]["vms_per_side"] == 1 and report["kvm"]["threads"] >= 1


def test_kvm_vcpus_and_a_vfio_device_migrate_sequentially_too(run) -> None:
    spec = parse_spec({"seed": 3, "vcpus": {"count": 32, "backend": "kvm"},
                       "devices": [{"name": "nic0", "size": "4MiB"}]})
    report = run(migrate_locally(spec, MigrationParams(workers=1, schedule=Schedule.SEQUENTIAL)))
    assert report.verified
    assert len(report.devices) == 36  # 32 vCPUs, PIT, clock, irqchip, one VFIO device


def test_vm_level_state_loads_before_the_vcpus_of_its_vm(run) -> None:
    spec = parse_spec({"seed": 5, "vcpus": {"count": 16, "backend": "kvm"}})
    report = run(migrate_locally(spec, MigrationParams(workers=2)))
    assert report.verified
    vm_parts = [d for d in report.devices if d.id.startswith("vm/")]
    assert {d.dest_worker for d in vm_parts} == {0}
    first_cpu = min(d.load_start_ms for d in report.devices
                    if d.id.startswith("cpu/") and d.dest_worker == 0)
    assert max(d.load_done_ms for d in vm_parts) <= first_cpu


def test_distinct_seeded_vcpus_give_distinct_digests(run) -> None:
    from devstate.migration.local import destination
    from devstate.migration.source import SourceVM

    spec = parse_spec({"seed": 4, "vcpus": {"count": 8, "backend": "kvm"}})

    async def scenario() -> dict[str, str]:
        async with SourceVM(spec, MigrationParams(workers=2)) as source, \
                destination(spec, MigrationParams(workers=2)) as dest:
            before = await source.digests()
            assert (await source.migrate(dest.address, compare_digests=True)).verified
            return before

    # A round trip of identical vCPUs would prove little: every source vCPU differs.
    digests = run(scenario())
    assert len({h for device, h in digests.items() if device.startswith("cpu/")}) == 8


@pytest.mark.parametrize("engine", ["native", "ctypes"])
def test_every_vcpu_is_in_one_vm_owned_by_worker_0_and_the_report_says_how(
        engine: str, tmp_path: Path) -> None:
    from devstate.devices.kvm.engine import native_available

    if engine == "native" and not native_available():
        pytest.skip("the C extension devstate.devices.kvm._steps is not built")
    path = tmp_path / "kvm-64.toml"
    path.write_text('seed = 6\n[vcpus]\ncount = 64\nbackend = "kvm"\n')
    # A process of its own: its workers (and its destination's) take the engine from the
    # environment they start with.
    done = subprocess.run([sys.executable, "-m", "devstate", "migrate", "--spec", str(path),
                           "--workers", "2", "--json"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DEVSTATE_KVM_ENGINE": engine})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verified"] and report["mode"] == "concurrent"
    assert {d["source_worker"] for d in report["devices"]} == {0}
    assert {d["dest_worker"] for d in report["devices"]} == {0}
    kvm = report["kvm"]
    assert kvm["vms_per_side"] == 1 and kvm["engine"] == engine
    assert kvm["threads"] == (len(os.sched_getaffinity(0)) if engine == "native" else 1)
    assert kvm["get_ms"] > 0 and kvm["put_ms"] > 0


def test_the_sharded_experiment_is_labelled_and_gives_each_worker_a_vm(run) -> None:
    spec = parse_spec({"seed": 6, "vcpus": {"count": 64, "backend": "kvm"}})
    params = MigrationParams(workers=2, sharded_vms=True)
    report = run(migrate_locally(spec, params))
    assert report.verified and report.mode == "sharded-vms"
    cpus = [d for d in report.devices if d.id.startswith("cpu/")]
    assert {d.source_worker for d in cpus} == {0, 1} == {d.dest_worker for d in cpus}
    assert report.kvm is not None and report.kvm.vms_per_side == 2
    assert "not a real guest shape" in format_table([report])


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096], ids=["batched", "one-by-one"])
def test_vcpu_records_ride_in_batches_when_a_chunk_slot_holds_them(
        run, chunk_bytes: int) -> None:
    """The source's batches of vCPU records go as RECORDS packets (one header, checksum and
    send per batch) when a chunk slot holds two or more records, else one RECORD each
    (a vCPU's record is ~7 KB, more than chunks of 4 KiB): either way every record crosses
    once and the migration verifies."""
    from devstate.migration.local import destination
    from devstate.migration.source import SourceVM

    spec = parse_spec({"seed": 9, "vcpus": {"count": 40, "backend": "kvm"}})
    table = device_table(spec)
    params = MigrationParams(chunk_bytes=chunk_bytes)

    async def scenario() -> tuple[Any, Proxy]:
        async with SourceVM(spec, params) as source, destination(
                spec, params, incoming="tcp:127.0.0.1:0") as dest:
            async with faulty_proxy((dest.address.host, dest.address.port), {},
                                    count_packets=len(table)) as proxy:
                report = await source.migrate(parse_uri(proxy.uri), compare_digests=True)
            return report, proxy

    report, proxy = run(scenario())
    assert report.verified and all(d.verified for d in report.devices)
    assert sum((t.records for t in proxy.data.values()), Counter()) == Counter(range(len(table)))
    batches = sum(t.batches for t in proxy.data.values())
    packets = sum(t.packets for t in proxy.data.values())
    if chunk_bytes >= 1 << 20:  # 40 vCPUs: a batch of 4 per lane first, then the rest
        # A lane per owner thread: two with the native engine here, one with ctypes.
        assert report.kvm is not None
        lanes = report.kvm.threads
        assert lanes + 1 <= batches <= 3 * lanes and packets == batches + 3, \
            (lanes, batches, packets)
    else:  # the 3 VM-level records and 40 vCPUs, one packet each
        assert batches == 0 and packets == 43, packets


def test_one_record_per_packet_batches_fit_the_record_slots_of_both_threads(run) -> None:
    """Records that ride one to a packet (chunks of 4 KiB) are got into a record slot
    each, a lane's whole batch at once: with 64 slots (the fewest the cost probe takes) and
    two owner threads, each lane's batch must be at most 32, or each lane holds part of its
    batch and waits for slots the other holds, forever."""
    spec = parse_spec({"seed": 10, "vcpus": {"count": 160, "backend": "kvm"}})
    params = MigrationParams(chunk_bytes=4096, record_slots=64, vcpu_threads=2)

    async def bounded() -> Any:
        async with asyncio.timeout(120):
            return await migrate_locally(spec, params, compare_digests=True)

    report = run(bounded())
    assert report.verified and report.kvm is not None and report.kvm.threads == 2


@pytest.mark.parametrize("readback", list(Readback))
def test_a_vcpu_record_the_destination_refuses_fails_the_migration_and_the_source_runs_on(
        run, readback: Readback) -> None:
    from devstate.migration.local import destination
    from devstate.migration.source import SourceVM

    spec = parse_spec({"seed": 9, "vcpus": {"count": 40, "backend": "kvm"}})
    faulty = MigrationParams(workers=2, fault="record-put:corrupt:1", vcpu_readback=readback)

    async def scenario() -> tuple[str, bool, bool]:
        async with SourceVM(spec, MigrationParams(workers=2)) as source:
            async with destination(spec, faulty) as dest:
                with pytest.raises(MigrationFailed) as failed:
                    await source.migrate(dest.address, compare_digests=True)
            running = source.running
            async with destination(spec, MigrationParams(workers=2)) as dest:
                again = await source.migrate(dest.address, compare_digests=True)
            return str(failed.value), running, again.verified

    message, running, verified = run(scenario())
    # The second batch's first record had its magic flipped after its checksum was verified:
    # the native framing check (or ctypes' parse) refuses it, naming the vCPU.
    assert re.search(r"cpu/\d+: (put step \d+: record header|bad record magic)", message), message
    assert running and verified


# --- Destinations of another worker count, and spread routing out of one VM -----------


@pytest.mark.parametrize(("source_workers", "dest_workers"), [(2, 3), (3, 1)],
                         ids=["2-to-3-workers", "3-to-1-worker"])
def test_256_kvm_vcpus_migrate_to_a_destination_of_another_worker_count(
        run, source_workers: int, dest_workers: int) -> None:
    spec = parse_spec({"seed": 7, "vcpus": {"count": 256, "backend": "kvm"}})
    report = run(migrate_locally(spec, MigrationParams(workers=source_workers),
                                 dest_params=MigrationParams(workers=dest_workers)))
    assert report.verified and all(d.verified for d in report.devices)
    assert report.mode == "concurrent" and report.workers == source_workers
    cpus = [d for d in report.devices if d.id.startswith("cpu/")]
    # cpu/N on both sides: the destination worker that puts cpu/N created vCPU id N in its VM,
    # and the digests compared per id (verified) say it holds cpu/N's state.
    assert sorted(d.id for d in cpus) == sorted(f"cpu/{n}" for n in range(256))
    assert sorted(d.id for d in report.devices if d.id.startswith("vm/")) == [
        "vm/clock", "vm/irqchip", "vm/pit"]
    assert {d.source_worker for d in cpus} == {0} == {d.dest_worker for d in cpus}
    assert all(d.bytes > 0 for d in report.devices)


@pytest.mark.parametrize("dest_sharded", [True, False],
                         ids=["to-sharded-2-workers", "to-one-vm-2-workers"])
def test_one_vm_spread_routing_sends_worker_0s_vcpus_on_every_channel(
        run, dest_sharded: bool) -> None:
    from devstate.migration.local import destination
    from devstate.migration.source import SourceVM

    count = 128
    spec = parse_spec({"seed": 8, "vcpus": {"count": count, "backend": "kvm"}})
    table = device_table(spec)
    params = MigrationParams(workers=2, routing=Routing.SPREAD)

    async def scenario() -> tuple[Any, Proxy, tuple[int, ...], tuple[int, ...]]:
        async with SourceVM(spec, params) as source, destination(
                spec, MigrationParams(workers=2, sharded_vms=dest_sharded),
                incoming="tcp:127.0.0.1:0") as dest:
            async with faulty_proxy((dest.address.host, dest.address.port), {},
                              count_packets=len(table)) as proxy:
                report = await source.migrate(parse_uri(proxy.uri), compare_digests=True)
            return report, proxy, source.outgoing.routes.channels_of(1), source.plan.devices_of(1)

    report, proxy, channels_of_1, devices_of_1 = run(scenario())
    assert report.verified and all(d.verified for d in report.devices)
    assert report.mode == "concurrent"
    assert {d.source_worker for d in report.devices} == {0}
    assert {d.dest_worker for d in report.devices} == ({0, 1} if dest_sharded else {0})
    # Source worker 1 owns channel 1 and no device: whatever channel 1 carried was worker
    # 0's, handed to worker 1 through the arena.
    assert channels_of_1 == (1,) and devices_of_1 == ()
    assert sorted(proxy.data) == [0, 1]
    for k, tally in proxy.data.items():
        assert tally.fin_seq == tally.packets, f"channel {k}: FIN counts {tally.fin_seq}, " \
                                               f"{tally.packets} packets came before it"
    # Every device's record crossed exactly once, on one channel or the other.
    crossed = proxy.data[0].records + proxy.data[1].records
    assert crossed == Counter(range(len(table)))
    cpu_ids = {d.index for d in table if d.id.startswith("cpu/")}
    on_1 = {i for i in proxy.data[1].records if i in cpu_ids}
    on_0 = {i for i in proxy.data[0].records if i in cpu_ids}
    # Round-robin: about half of the vCPU records ride each channel.
    assert len(on_1) >= 0.3 * count and len(on_0) >= 0.3 * count, (len(on_0), len(on_1))
    total = sum(t.bytes for t in proxy.data.values())
    assert proxy.data[1].bytes >= 0.3 * total, (proxy.data[0].bytes, proxy.data[1].bytes)


@pytest.mark.parametrize("readback", list(Readback))
def test_the_destination_reads_vcpus_back_before_commit_only_when_asked(
        run, readback: Readback) -> None:
    spec = parse_spec({"seed": 10, "vcpus": {"count": 32, "backend": "kvm"}})
    report = run(migrate_locally(spec, MigrationParams(workers=2, vcpu_readback=readback)))
    assert report.verified  # the digests after the resume, in both modes
    assert report.kvm is not None and report.kvm.put_ms > 0
    # The readback is its own stage of the put's program, timed apart.
    assert (report.kvm.readback_ms > 0) == (readback is Readback.BEFORE_COMMIT)
    assert report.destination_params["vcpu_readback"] == readback.value


def test_state_that_differs_after_a_verified_load_is_reported_not_verified(run) -> None:
    """The destination changes RBP of one vCPU after its record's checksum was verified,
    to a value KVM takes (the put and its readback agree with it): the migration
    completes, and only the digests compared after the resume can tell. The report must
    say that vCPU, and so the migration, is not verified."""
    spec = parse_spec({"seed": 12, "vcpus": {"count": 8, "backend": "kvm"}})
    report = run(migrate_locally(spec, MigrationParams(workers=2),
                                 dest_params=MigrationParams(workers=2,
                                                             fault="record-put:alter")))
    assert report.digests_compared
    assert not report.verified
    wrong = [d.id for d in report.devices if not d.verified]
    assert len(wrong) == 1 and wrong[0].startswith("cpu/"), wrong
    assert "NOT verified" in format_table([report])
