"""The measurement scripts: host record, CPU split, a tiny sweep, the QEMU comparison."""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import hostinfo  # noqa: E402
import sweep  # noqa: E402

HOST_KEYS = {"cpu_model", "logical_cpus", "physical_cores", "affinity", "cgroup_cpu_quota",
             "memory_total_bytes", "memory_available_bytes", "kernel", "python",
             "kvm_usable", "kvm_reason", "devstate_version", "git_commit"}


def script(name: str, *args: str, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/NAME`` from the repository root, as a user would."""
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def kvm_and_qemu() -> tuple[bool, str]:
    if shutil.which("qemu-system-x86_64") is None:
        return False, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    from devstate.cli import kvm_usable

    return kvm_usable()


# host_info


def test_host_info_has_every_key_with_sane_values() -> None:
    info = hostinfo.host_info()
    assert info.keys() >= HOST_KEYS
    assert info["logical_cpus"] >= 1
    assert info["physical_cores"] is None or 1 <= info["physical_cores"] <= info["logical_cpus"]
    assert info["affinity"] == sorted(os.sched_getaffinity(0))
    assert 0 < info["memory_available_bytes"] <= info["memory_total_bytes"]
    assert info["kernel"] == platform.release()
    assert info["python"] == platform.python_version()
    assert isinstance(info["kvm_usable"], bool) and info["kvm_reason"]
    assert info["devstate_version"]
    quota = info["cgroup_cpu_quota"]
    assert quota is None or quota["cpus"] > 0
    json.dumps(info)  # stored as host.json


def fake_cgroup(tmp_path: Path, files: dict[str, str], membership: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    (tmp_path / "self").write_text(membership + "\n")
    return root, tmp_path / "self"


@pytest.mark.parametrize(("files", "membership", "cpus"), [
    ({"cpu.max": "max 100000"}, "0::/", None),
    ({"cpu.max": "150000 100000"}, "0::/", 1.5),
    ({"box/cpu.max": "200000 100000", "cpu.max": "max 100000"}, "0::/box", 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "3:cpu:/", None),
    ({"cpu,cpuacct/job/cpu.cfs_quota_us": "50000",
      "cpu,cpuacct/job/cpu.cfs_period_us": "100000"}, "4:cpu,cpuacct:/job", 0.5),
    ({}, "0::/", None),
])
def test_cgroup_quota_reads_v2_then_v1_and_unlimited_is_none(
        tmp_path: Path, files: dict[str, str], membership: str, cpus: float | None) -> None:
    root, self_cgroup = fake_cgroup(tmp_path, files, membership)
    quota = hostinfo.cgroup_cpu_quota(root, self_cgroup)
    assert (quota and quota["cpus"]) == cpus


# CPU split and pinning


@pytest.mark.parametrize(("usable", "source", "dest"), [
    ([0], [0], [0]),
    ([0, 1], [0], [1]),
    ([0, 1, 2], [0], [1]),
    (list(range(64)), list(range(32)), list(range(32, 64))),
])
def test_sides_split_the_usable_cpus_in_halves(usable: list[int], source: list[int],
                                               dest: list[int]) -> None:
    sides = hostinfo.side_cpus(usable)
    assert (list(sides.source), list(sides.dest)) == (source, dest)
    assert sides.per_side == len(source)
    if len(usable) in (2, 3):
        assert "one core per side" in sides.note


def test_the_destination_really_gets_the_second_half() -> None:
    from devstate.migration.local import dest_cpus

    sides = hostinfo.side_cpus(list(range(64)))
    source, dest = sweep.pinned_params(sweep.Point(512, 2, 8, sweep.Schedule.CONCURRENT), sides)
    assert source.cpus == tuple(range(32))
    assert sorted(dest_cpus(dest)) == list(range(32, 64))


# sweep.py


@pytest.mark.slow  # a sweep of real migrations
def test_a_tiny_sweep_writes_rows_host_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = script("sweep.py", "--workers", "2", "--vcpus", "16", "--devices", "0", "1",
                  "--device-size", "1MiB", "--firmware-ms", "5", "--rounds", "1",
                  "--backend", "sim-vcpu", "--out", str(out))
    assert done.returncode == 0, done.stderr + done.stdout
    with (out / "sweep.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == sweep.COLUMNS
        rows = list(reader)
    # Per device count: the sequential baseline, then the one concurrent point.
    assert [(r["devices"], r["mode"], r["workers"]) for r in rows] == [
        ("0", "sequential", "1"), ("0", "concurrent", "2"),
        ("1", "sequential", "1"), ("1", "concurrent", "2")]
    for row in rows:
        assert row["error"] == "" and row["verified"] == "True"
        assert float(row["downtime_ms"]) > 0 and float(row["expected_ms"]) > 0
        assert row["vcpus"] == "16" and row["backend"] == "sim-vcpu"
    per_side = hostinfo.side_cpus().per_side
    assert [r["oversubscribed"] for r in rows] == [
        "False", str(per_side < 2), "False", str(per_side < 2)]
    host = json.loads((out / "host.json").read_text())
    assert host.keys() >= HOST_KEYS
    assert host["sweep"]["source_cpus"] != [] and host["sweep"]["cpu_split"]
    pictures = sorted(out.glob("*.png"))
    assert pictures and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)


# qemu_compare.py


def test_qemu_compare_without_qemu_says_how_to_install_it(tmp_path: Path) -> None:
    done = script("qemu_compare.py", "--out", str(tmp_path / "out"),
                  env={**os.environ, "PATH": str(tmp_path)})  # an empty directory
    assert done.returncode == 0, done.stderr
    assert "QEMU is not installed" in done.stdout
    assert "apt-get install qemu-system-x86" in done.stdout
    assert not (tmp_path / "out").exists()


def test_qemu_compare_tiny_real_comparison(tmp_path: Path) -> None:
    ok, why = kvm_and_qemu()
    if not ok:
        pytest.skip(why)
    out = tmp_path / "out"
    done = script("qemu_compare.py", "--vcpus", "4", "--rounds", "1", "--settle", "0.2",
                  "--out", str(out))
    assert done.returncode == 0, done.stderr + done.stdout
    with (out / "qemu_compare.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert row["error"] == "" and row["devstate_verified"] == "True"
    assert float(row["qemu_downtime_ms"]) >= 0
    assert 0 < float(row["qemu_stop_to_resume_ms"]) < 10_000
    assert float(row["devstate_downtime_ms"]) > 0
    assert "QEMU emulator version" in json.loads((out / "host.json").read_text())[
        "qemu_version"]
    assert "stop->resume" in done.stdout
