"""Real KVM vCPUs migrate between two processes, sharded over the workers, every one verified."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devstate.cli import kvm_usable
from devstate.local import migrate_locally
from devstate.settings import Settings
from devstate.spec import parse_spec

USABLE, WHY = kvm_usable()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"needs KVM: {WHY}")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
    report = run(migrate_locally(spec, Settings(workers=1, concurrent=False)))
    assert report.verified
    assert len(report.devices) == 36  # 32 vCPUs, PIT, clock, irqchip, one VFIO device


def test_vm_level_state_loads_before_the_vcpus_of_its_vm(run) -> None:
    spec = parse_spec({"seed": 5, "vcpus": {"count": 16, "backend": "kvm"}})
    report = run(migrate_locally(spec, Settings(workers=2)))
    assert report.verified
    vm_parts = [d for d in report.devices if d.id.startswith("vm/")]
    assert {d.dest_worker for d in vm_parts} == {0}
    first_cpu = min(d.load_start_ms for d in report.devices
                    if d.id.startswith("cpu/") and d.dest_worker == 0)
    assert max(d.load_done_ms for d in vm_parts) <= first_cpu


def test_distinct_seeded_vcpus_give_distinct_digests(run) -> None:
    from devstate.local import destination
    from devstate.source import SourceVM

    spec = parse_spec({"seed": 4, "vcpus": {"count": 8, "backend": "kvm"}})

    async def scenario() -> dict[str, str]:
        async with SourceVM(spec, Settings(workers=2)) as source, \
                destination(spec, Settings(workers=2)) as dest:
            before = await source.digests()
            assert (await source.migrate(dest.address, compare_digests=True)).verified
            return before

    # A round trip of identical vCPUs would prove little: every source vCPU differs.
    digests = run(scenario())
    assert len({h for device, h in digests.items() if device.startswith("cpu/")}) == 8


def test_single_vm_mode_puts_every_vcpu_in_one_worker_on_threads(run) -> None:
    spec = parse_spec({"seed": 6, "vcpus": {"count": 64, "backend": "kvm"}})
    report = run(migrate_locally(spec, Settings(workers=2, single_vm=True)))
    assert report.verified and report.mode == "single-vm"
    assert {d.source_worker for d in report.devices} == {0}
    assert {d.dest_worker for d in report.devices} == {0}
