"""Soak: 200 migrations back and forth between the same two ``devstate vm`` processes.

Driven over QMP, as a controller would: A migrates to B, then B back to A, and so on; every
migration is verified digest by digest. The two process trees' resident memory, open fds
and devstate arenas in /dev/shm are sampled after every migration; over the run they must
stay flat: fds and arenas exactly as after the first migrations, RSS within
``RSS_GROWTH`` of its early level. The figures go to the test's output (``-s``) and, with
``DEVSTATE_SOAK_JSON=path``, to a file (docs/reliability.md reports one run).

Marked ``slow`` (about a minute here); ``.ci/run`` runs it with the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
from pathlib import Path
from typing import Any

import psutil
import pytest

from devstate.arena.slots import PREFIX, SHM_DIR
from devstate.config.spec import parse_spec
from tests.test_qmp_migration import _write_spec, client, vm_process

MIGRATIONS = 200
WARMUP = 20          # the first migrations fill caches and pools: the baseline comes after
RSS_GROWTH = 0.10    # allowed growth of the trees' RSS from the baseline to the end
MIGRATION_TIMEOUT_S = 60.0
MACHINE = parse_spec({"seed": 12, "vcpus": {"count": 32},
                      "devices": [{"name": "nic0", "size": "4MiB", "firmware_latency_ms": 5}]})


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _sample(pids: list[int]) -> dict[str, int]:
    """RSS, fds and processes of both VMs' trees, and the devstate arenas in /dev/shm."""
    rss = fds = procs = 0
    for pid in pids:
        for proc in _tree(pid):
            try:
                rss += proc.memory_info().rss
                fds += proc.num_fds()
                procs += 1
            except psutil.NoSuchProcess:
                pass
    arenas = sum(1 for name in os.listdir(SHM_DIR) if name.startswith(PREFIX))
    return {"rss": rss, "fds": fds, "procs": procs, "arenas": arenas}


async def _migrate(source: Any, dest: Any, uri: str) -> dict[str, Any]:
    await dest.execute("migrate-incoming", {"uri": uri})
    await source.execute("migrate", {"uri": uri})
    async with asyncio.timeout(MIGRATION_TIMEOUT_S):
        while (info := await source.execute("query-migrate"))["status"] not in (
                "completed", "failed", "cancelled"):
            await asyncio.sleep(0.01)  # polling, as a controller without events does
    return info


@pytest.mark.slow
def test_200_migrations_back_and_forth_stay_flat(run, tmp_path: Path) -> None:
    spec_path = _write_spec(tmp_path, MACHINE)

    async def soak() -> list[dict[str, Any]]:
        samples = []
        async with vm_process(spec_path, tmp_path / "a.qmp") as a_path, \
                vm_process(spec_path, tmp_path / "b.qmp", "--incoming", "defer") as b_path, \
                client(a_path, "a") as a, client(b_path, "b") as b:
            pids = [_pid_of(a_path), _pid_of(b_path)]
            for n in range(MIGRATIONS):
                source, dest, to = (a, b, "b") if n % 2 == 0 else (b, a, "a")
                info = await _migrate(source, dest, f"unix:{tmp_path / to}.in")
                assert info["status"] == "completed" and info["devstate"]["verified"], \
                    f"migration {n}: {info.get('error-desc')}"
                samples.append({"n": n, "downtime_ms": info["downtime"], **_sample(pids)})
            for qmp in (a, b):
                await qmp.execute("quit")
        return samples

    samples = run(soak())
    base, end = samples[WARMUP:WARMUP + 10], samples[-10:]
    figures = {
        "migrations": len(samples),
        "rss_mib_after_warmup": round(statistics.mean(s["rss"] for s in base) / 2**20, 1),
        "rss_mib_at_end": round(statistics.mean(s["rss"] for s in end) / 2**20, 1),
        "fds": sorted({s["fds"] for s in samples[WARMUP:]}),
        "processes": sorted({s["procs"] for s in samples[WARMUP:]}),
        "arenas": sorted({s["arenas"] for s in samples[WARMUP:]}),
        "downtime_ms_median": statistics.median(s["downtime_ms"] for s in samples),
    }
    print(f"soak: {json.dumps(figures)}")
    if os.environ.get("DEVSTATE_SOAK_JSON"):
        Path(os.environ["DEVSTATE_SOAK_JSON"]).write_text(json.dumps(
            {"figures": figures, "samples": samples}, indent=1))
    assert len(figures["fds"]) == 1, f"fd count moved: {figures['fds']}"
    assert len(figures["processes"]) == 1, f"process count moved: {figures['processes']}"
    assert len(figures["arenas"]) == 1, f"arenas in /dev/shm moved: {figures['arenas']}"
    growth = figures["rss_mib_at_end"] / figures["rss_mib_after_warmup"] - 1
    assert growth <= RSS_GROWTH, f"RSS grew {growth:.1%} over {MIGRATIONS} migrations"


def _pid_of(qmp_path: Path) -> int:
    """The pid of the process serving a QMP socket (the one that has it open)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if f"unix:{qmp_path}" in cmdline and "vm" in cmdline:
            return proc.pid
    raise AssertionError(f"no process serves {qmp_path}")
