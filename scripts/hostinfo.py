#!/usr/bin/env python3
"""What host a measurement ran on: CPUs, their limits, memory, kernel, KVM, devstate.

A downtime measured on a shared 2-core nested-KVM machine and one measured on a quiet
64-core host are different facts; every script that writes results stores
:func:`host_info` next to them. It also splits the usable CPUs between the two sides of a
migration on one host (:func:`side_cpus`), which the sweep and the QEMU comparison share.

Usage: ``python scripts/hostinfo.py`` prints the record as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CGROUP_ROOT = Path("/sys/fs/cgroup")


def host_info() -> dict[str, Any]:
    """The host as plain JSON-able data (keys below; a fact that cannot be read is None)."""
    memory = psutil.virtual_memory()
    kvm_ok, kvm_why = _kvm()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cgroup_cpu_quota": cgroup_cpu_quota(),
        "memory_total_bytes": memory.total,
        "memory_available_bytes": memory.available,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kvm_usable": kvm_ok,
        "kvm_reason": kvm_why,
        "devstate_version": devstate_version(),
        "git_commit": git_commit(),
    }


def cpu_model() -> str | None:
    """The first ``model name`` of /proc/cpuinfo (None where there is none, e.g. arm64)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT,
                     membership: Path = Path("/proc/self/cgroup")) -> dict[str, Any] | None:
    """This process's cgroup CPU bandwidth limit, or None when unlimited or unknown.

    cgroup v2 writes ``cpu.max`` as ``"QUOTA PERIOD"`` (``max`` for no limit); v1 has
    ``cpu.cfs_quota_us`` (-1 for no limit) and ``cpu.cfs_period_us``. The process's own
    cgroup (from /proc/self/cgroup) is read first, then the mount root, which is what a
    container sees as its own. ``cpus`` is the quota in CPUs (1.5: one and a half).
    ``root`` and ``membership`` are where the hierarchy is mounted and the process's
    /proc/self/cgroup (tests point them at a fake tree).
    """
    own_v2, own_v1 = _own_cgroups(membership)
    for base in _unique([root / own_v2.lstrip("/") if own_v2 else None, root]):
        path = base / "cpu.max"
        text = _read(path)
        if text is not None:
            quota, _, period = text.partition(" ")
            return None if quota == "max" else _quota(int(quota), int(period or 100000), path)
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        v1 = root / mount
        for base in _unique([v1 / own_v1.lstrip("/") if own_v1 else None, v1]):
            quota_text = _read(base / "cpu.cfs_quota_us")
            period_text = _read(base / "cpu.cfs_period_us")
            if quota_text is not None and period_text is not None:
                quota = int(quota_text)
                if quota < 0:
                    return None
                return _quota(quota, int(period_text), base / "cpu.cfs_quota_us")
    return None


def _quota(quota_us: int, period_us: int, path: Path) -> dict[str, Any]:
    return {"cpus": round(quota_us / period_us, 3), "quota_us": quota_us,
            "period_us": period_us, "file": str(path)}


def _own_cgroups(membership: Path) -> tuple[str | None, str | None]:
    """The cgroup path in the v2 hierarchy and in v1's cpu controller (/proc/PID/cgroup)."""
    v2 = v1 = None
    for line in (_read(membership) or "").splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _unique(paths: list[Path | None]) -> list[Path]:
    return list(dict.fromkeys(p for p in paths if p is not None))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _kvm() -> tuple[bool, str]:
    from devstate.cli import kvm_usable

    return kvm_usable()


def devstate_version() -> str | None:
    """The installed devstate's version (pyproject's, when it is not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("devstate")
    except importlib.metadata.PackageNotFoundError:
        pass
    import tomllib

    try:
        return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


def git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when the tree has changes; None without git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                 "--untracked-files=no"], check=True, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if status else head


@dataclass(frozen=True, slots=True)
class SideCpus:
    """The CPUs each side of a local migration is pinned to, and what that means."""

    source: tuple[int, ...]
    dest: tuple[int, ...]
    note: str

    @property
    def per_side(self) -> int:
        """CPUs of the smaller side: more workers than this are oversubscribed."""
        return min(len(self.source), len(self.dest))


def side_cpus(usable: list[int] | None = None) -> SideCpus:
    """Split the usable CPUs: the source gets the first half, the destination the second.

    Both halves are the same size, so neither side is favoured; an odd CPU out is left to
    the coordinators and the rest of the host. With one CPU both sides share it, which
    the note says.
    """
    cpus = sorted(usable if usable is not None else os.sched_getaffinity(0))
    if len(cpus) < 2:
        return SideCpus(tuple(cpus), tuple(cpus),
                        f"one usable CPU ({cpus}): both sides share it")
    half = len(cpus) // 2
    source, dest = tuple(cpus[:half]), tuple(cpus[half:2 * half])
    spare = f"; CPU {cpus[-1]} left to neither side" if len(cpus) % 2 else ""
    if half == 1:
        note = (f"{len(cpus)} usable CPUs: one core per side (source {source[0]}, "
                f"destination {dest[0]}){spare}; more than 1 worker is oversubscribed")
    else:
        note = (f"{len(cpus)} usable CPUs: source {_ranges(source)}, destination "
                f"{_ranges(dest)}{spare}")
    return SideCpus(source, dest, note)


def _ranges(cpus: tuple[int, ...]) -> str:
    """``0-3,8`` for (0, 1, 2, 3, 8)."""
    parts: list[str] = []
    start = prev = cpus[0]
    for cpu in (*cpus[1:], None):
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


if __name__ == "__main__":
    print(json.dumps(host_info(), indent=2))
