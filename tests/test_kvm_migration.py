"""Real KVM vCPUs migrate between two processes, sharded over the workers, every one verified."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from devstate.cli import kvm_usable
from devstate.config.params import MigrationParams, Routing, Schedule
from devstate.config.spec import parse_spec
from devstate.devices import device_table
from devstate.migration.local import migrate_locally
from devstate.net.transport import parse_uri
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
    assert {d["source_worker"] for d in cpus} == {0, 1}  # sharded


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


def test_single_vm_mode_puts_every_vcpu_in_one_worker_on_threads(run) -> None:
    spec = parse_spec({"seed": 6, "vcpus": {"count": 64, "backend": "kvm"}})
    report = run(migrate_locally(spec, MigrationParams(workers=2, single_vm=True)))
    assert report.verified and report.mode == "single-vm"
    assert {d.source_worker for d in report.devices} == {0}
    assert {d.dest_worker for d in report.devices} == {0}


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
    assert {d.source_worker for d in cpus} == set(range(source_workers))  # sharded
    assert {d.dest_worker for d in cpus} == set(range(dest_workers))
    assert all(d.bytes > 0 for d in report.devices)


@pytest.mark.parametrize("dest_single_vm", [False, True],
                         ids=["to-sharded-2-workers", "to-single-vm-2-workers"])
def test_single_vm_spread_routing_sends_worker_0s_vcpus_on_every_channel(
        run, dest_single_vm: bool) -> None:
    from devstate.migration.local import destination
    from devstate.migration.source import SourceVM

    count = 128
    spec = parse_spec({"seed": 8, "vcpus": {"count": count, "backend": "kvm"}})
    table = device_table(spec)
    params = MigrationParams(workers=2, single_vm=True, routing=Routing.SPREAD)

    async def scenario() -> tuple[Any, Proxy, tuple[int, ...], tuple[int, ...]]:
        async with SourceVM(spec, params) as source, destination(
                spec, MigrationParams(workers=2, single_vm=dest_single_vm),
                incoming="tcp:127.0.0.1:0") as dest:
            async with faulty_proxy((dest.address.host, dest.address.port), {},
                              count_packets=len(table)) as proxy:
                report = await source.migrate(parse_uri(proxy.uri), compare_digests=True)
            return report, proxy, source.outgoing.routes.channels_of(1), source.plan.devices_of(1)

    report, proxy, channels_of_1, devices_of_1 = run(scenario())
    assert report.verified and all(d.verified for d in report.devices)
    assert report.mode == "single-vm"
    assert {d.source_worker for d in report.devices} == {0}
    assert {d.dest_worker for d in report.devices} == ({0} if dest_single_vm else {0, 1})
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
