#!/usr/bin/env python3
"""Per-side KVM get/put of N vCPUs of ONE VM, devstate's engines beside the physical limit.

The host is shared and noisy (a nested KVM host's ioctl cost moves by tens of percent over
minutes), so every round runs every variant (native on 1 and T threads, ctypes on 1: see
benches/one_vm.py) and then the C probe, and the table gives medians and ratios; every
get and put is checked (stable digests) after it is timed.
Usage: ``python scripts/kvm_per_side.py [--vcpus 288 512] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benches.one_vm import (  # noqa: E402
    CPUS,
    OneVmSides,
    interleaved_round,
    limit_ms,
    with_probe,
)
from devstate.cli import kvm_usable  # noqa: E402


def measure(count: int, rounds: int, binary: Path | None) -> dict[str, float]:
    """Median ms of each "op variant", the probe's included."""
    sides = OneVmSides(count)
    samples: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            interleaved_round(sides, binary, samples)
    finally:
        sides.close()
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vcpus", type=int, nargs="+", default=[288, 512])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    usable, why = kvm_usable()
    if not usable:
        print(f"KVM is not usable here: {why}", file=sys.stderr)
        return 1
    t = len(CPUS)
    print(f"host: {os.cpu_count()} CPUs, affinity {list(CPUS)}; {args.rounds} interleaved "
          "rounds; one VM per side; puts without readback (as the probe's)")

    def run(binary: Path | None) -> None:
        if binary is None:
            print("gcc not found: no physical-limit probe", file=sys.stderr)
        for count in args.vcpus:
            med = measure(count, args.rounds, binary)
            for op in ("get", "put"):
                cells = "  ".join(f"{name.split(' ')[1]} {ms:6.1f} ms"
                                  for name, ms in med.items() if name.startswith(op))
                print(f"{count:5d} vCPUs {op}: {cells}")
                if f"{op} native-1" in med:
                    line = (f"      native {t} threads / 1 thread: "
                            f"{med[f'{op} native-1'] / med[f'{op} native-{t}']:.2f}x")
                    if f"{op} probe-1" in med:
                        line += (f"; native 1 thread / probe 1 thread: "
                                 f"{med[f'{op} native-1'] / med[f'{op} probe-1']:.2f}")
                    print(line)
            if binary is not None:
                limit = limit_ms({"get-1": med["get probe-1"], "put-1": med["put probe-1"]})
                print(f"      limit of a stop-and-copy on this host: {limit:.1f} ms")

    with_probe(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
