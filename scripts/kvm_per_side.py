#!/usr/bin/env python3
"""Per-side KVM get/put of N vCPUs, variants interleaved round by round.

The host is shared and noisy (a nested KVM host's ioctl cost moves by tens of percent
over minutes), so this alternates sequential, one-VM threads and the sharded pool in
every round and reports medians and ratios; pytest-benchmark runs variants one after
another. Usage: ``python scripts/kvm_per_side.py [--vcpus 512 1024] [--rounds 9]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benches.test_bench_vcpus import OneProcess, Sharded, _without_gc  # noqa: E402
from devstate.cli import kvm_usable  # noqa: E402
from devstate.worker import jobs as m  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    _without_gc(fn)()
    return time.perf_counter() - start


def measure(count: int, rounds: int) -> dict[str, dict[str, float]]:
    one, sharded = OneProcess(count), Sharded(count)
    samples: dict[str, dict[str, list[float]]] = {"get": {}, "put": {}}
    try:
        for _ in range(rounds):
            for variant, get, put in (
                ("sequential", lambda: one.get(range(count)), lambda: one.put(range(count))),
                ("threads", lambda: one.threaded(one.get), lambda: one.threaded(one.put)),
                ("sharded", lambda: sharded.call(m.SnapshotRecords()),
                 lambda: sharded.call(m.RestoreRecords())),
            ):
                samples["get"].setdefault(variant, []).append(timed(get))
                samples["put"].setdefault(variant, []).append(timed(put))
    finally:
        one.close()
        sharded.close()
    return {side: {v: statistics.median(x) for v, x in per.items()}
            for side, per in samples.items()}


def contention(count: int, rounds: int) -> tuple[float, float]:
    """Per-get µs in worker 0: alone, and while worker 1 gets its share too.

    On a nested KVM host every vCPU ioctl exits to the outer hypervisor; two cores doing
    that at once slow each other, which bounds what sharding can gain there.
    """
    sharded = Sharded(count)
    alone, both = [], []
    share = count / 2
    try:
        pool = sharded.machine.pool
        for _ in range(rounds):
            ns, _ = sharded.loop.run_until_complete(pool.call(0, m.SnapshotRecords()))
            sharded.loop.run_until_complete(pool.call(0, m.RestoreRecords()))
            alone.append(ns / share / 1e3)
            times = sharded.loop.run_until_complete(
                pool.call_all({w: m.SnapshotRecords() for w in range(pool.size)}))
            sharded.call(m.RestoreRecords())
            both.append(max(ns for ns, _ in times.values()) / share / 1e3)
    finally:
        sharded.close()
    return statistics.median(alone), statistics.median(both)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vcpus", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    usable, why = kvm_usable()
    if not usable:
        print(f"KVM is not usable here: {why}", file=sys.stderr)
        return 1
    print(f"host: {os.cpu_count()} CPUs, affinity {sorted(os.sched_getaffinity(0))}; "
          f"{args.rounds} interleaved rounds; a put is load + readback + compare")
    for count in args.vcpus:
        medians = measure(count, args.rounds)
        for side, per in medians.items():
            best = min(per["sequential"], per["threads"])
            cells = "  ".join(f"{v} {t * 1e3:7.1f} ms ({t / count * 1e6:5.1f} us/vCPU)"
                              for v, t in per.items())
            print(f"{count:5d} vCPUs {side}: {cells}  sharded speedup "
                  f"{best / per['sharded']:.2f}x")
    alone, both = contention(args.vcpus[0], args.rounds)
    print(f"per get inside a worker: {alone:.1f} us alone, {both:.1f} us while the other "
          f"worker gets too ({both / alone:.2f}x: the host's cost of parallel vCPU ioctls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
