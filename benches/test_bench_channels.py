"""The seed thread's question: is one large, opaque, ordered device stream worth spreading
over several channels and reassembling in order?

One vfio-sim device (its model fast enough not to be the limit) migrates between two
``devstate`` processes over TCP with 1, 2, 4 and 8 data channels, routed
by ``affinity`` (the stream rides one channel whatever the count) or ``spread`` (its packets
go round-robin over every channel and the destination reassembles them in order), on:

* ``shaped``: two network namespaces on a veth link whose rate is limited *per flow*
  (``FLOW_MBIT``), as per-flow policing and ECMP hashing limit real networks (256 MiB);
* ``loopback``: plain 127.0.0.1 in this namespace, where the two cores are the limit
  (1 GiB).

Each variant reports its downtime, throughput and the destination's CPU seconds for the
migration (coordinator, workers and device models); ``extra_info`` gives, per link and
channel count, spread's speedup over affinity and its extra destination CPU: the cost of
handoffs and in-order reassembly.

Run: ``python -m pytest benches/test_bench_channels.py --benchmark-only`` (about 2 minutes).
CI's quick mode (``--benchmark-disable``) moves 32 MiB once per variant, checks every
migration verifies, and skips the shaped link where namespaces cannot be made.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from benches.conftest import median_s

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netns import Link, netns_unavailable, two_hosts  # noqa: E402

FLOW_MBIT = 400.0
FULL_SIZE = {"shaped": 256 << 20, "loopback": 1 << 30}  # shaped: 5 s on one flow
QUICK_SIZE = 32 << 20
CASES = [(link, channels, routing)
         for link in ("shaped", "loopback")
         for channels in (1, 2, 4, 8)
         for routing in ("affinity", "spread")
         if not (channels == 1 and routing == "spread")]  # one channel: the same thing


def _spec(path: Path, size: int) -> Path:
    path.write_text(json.dumps({
        "name": "one-big-stream", "seed": 9, "vcpus": {"count": 0},
        "devices": [{"name": "big", "size": size, "read_bandwidth": "16GiB/s",
                     "write_bandwidth": "16GiB/s"}]}))
    return path


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its live descendants."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def migrate_once(spec: Path, channels: int, routing: str,
                 wrap: Callable[[str, list[str]], list[str]], dest_host: str) -> dict[str, Any]:
    """One migration between a ``devstate vm`` and a ``devstate migrate --to`` process.

    ``wrap(side, argv)`` places each side (e.g. in its namespace). Returns the source's
    report with the destination's CPU seconds for the migration added.
    """
    py = [sys.executable, "-m", "devstate"]
    dest = subprocess.Popen(wrap("dest", [*py, "vm", "--spec", str(spec), "--workers", "2",
                                          "--incoming", f"tcp:{dest_host}:0"]),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert dest.stdout is not None
        word, _, uri = dest.stdout.readline().strip().partition(" ")
        assert word == "ready", "the destination did not start"
        before = _tree_cpu_s(dest.pid)
        source = subprocess.run(
            wrap("source", [*py, "migrate", "--spec", str(spec), "--to", uri, "--workers", "2",
                            "--channels", str(channels), "--routing", routing, "--json"]),
            capture_output=True, text=True, timeout=600)
        assert source.returncode == 0, source.stderr
        report = json.loads(source.stdout)
        report["dest_cpu_s"] = _tree_cpu_s(dest.pid) - before
        return report
    finally:
        dest.send_signal(signal.SIGTERM)
        try:
            dest.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dest.kill()
            dest.wait()


@pytest.fixture(scope="module")
def shaped_hosts() -> Any:
    reason = netns_unavailable()
    if reason:
        yield None, reason
        return
    with two_hosts(Link(flow_rate_mbit=FLOW_MBIT)) as hosts:
        yield hosts, ""


@pytest.mark.benchmark(group="channels")
@pytest.mark.parametrize(("link", "channels", "routing"), CASES,
                         ids=[f"{link}-{n}ch-{r}" for link, n, r in CASES])
def test_one_large_stream(benchmark, results, tmp_path, shaped_hosts, link: str,
                          channels: int, routing: str) -> None:
    quick = benchmark.disabled
    size = QUICK_SIZE if quick else FULL_SIZE[link]
    spec = _spec(tmp_path / "spec.json", size)
    if link == "shaped":
        hosts, reason = shaped_hosts
        if hosts is None:
            pytest.skip(f"no shaped link: {reason}")
        wrap, dest_host = hosts.command, hosts.dest_ip
    else:
        wrap, dest_host = (lambda side, argv: argv), "127.0.0.1"
    runs: list[dict[str, Any]] = []

    def once() -> None:
        report = migrate_once(spec, channels, routing, wrap, dest_host)
        assert report["verified"]
        runs.append(report)

    benchmark.pedantic(once, rounds=1 if quick or link == "shaped" else 3, iterations=1)
    best = min(runs, key=lambda r: r["downtime_ms"])
    seconds = best["downtime_ms"] / 1e3
    figures = {"downtime_ms": best["downtime_ms"],
               "mib_per_s": round(best["total_bytes"] / seconds / (1 << 20), 1),
               "dest_cpu_s": round(best["dest_cpu_s"], 3)}
    benchmark.extra_info.update(figures)
    seen = results.setdefault("channels", {})
    seen[f"{link}-{channels}-{routing}"] = figures  # type: ignore[assignment]
    affinity = seen.get(f"{link}-{channels}-affinity")
    if routing == "spread" and affinity:
        speedup = affinity["downtime_ms"] / best["downtime_ms"]  # type: ignore[index]
        cpu = best["dest_cpu_s"] / affinity["dest_cpu_s"] - 1  # type: ignore[index]
        benchmark.extra_info["speedup_over_affinity"] = round(speedup, 2)
        benchmark.extra_info["extra_dest_cpu"] = round(cpu, 3)
        if median_s(benchmark) is not None and link == "shaped" and channels == 4:
            assert speedup >= 2.5, f"spread over 4 channels is {speedup:.2f}x affinity"
