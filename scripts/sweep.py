#!/usr/bin/env python3
"""Downtime over a grid of workers x vCPUs x devices, each point a real local migration.

Every point runs :func:`devstate.migration.local.migrate_locally`: a destination process on this
host, both pools started, the VM stopped, its state moved over Unix sockets and verified.
Each (vCPUs, devices) pair also gets the sequential baseline (one worker, one device after
another), and rounds are interleaved (every point once, then again) so that a noisy shared
host spreads its noise over all points instead of one.

Pinning: the usable CPUs are split in two halves (:func:`hostinfo.side_cpus`), the
source's workers on the first, the destination's on the second. ``dest_cpus()`` derives
the destination's CPUs from the params it is given (the source's reversed, unless
told), so the destination gets params of its own whose ``cpus`` are the second half;
:func:`pinned_params` checks that. Only workers are pinned: the two coordinators
(this process and the destination's) run wherever the scheduler puts them. On a 2-core
host each side has one core, and more than one worker per side is *oversubscribed*:
allowed, measured, and flagged in the CSV (``oversubscribed``).

Output in ``--out``: ``sweep.csv`` (one row per point and round, written as it goes, so
Ctrl-C keeps every finished row), ``host.json`` (:func:`hostinfo.host_info` plus the
sweep's parameters and CPU split), ``downtime.png`` (downtime against workers, one panel
per vCPUs x devices, medians with min-max bars and the sequential baseline) and
``speedup.png`` (sequential median / concurrent median). ``expected_ms`` is the cost
model's estimate; the model starts from this host's stored constants (copied into
``OUT/costs.json``) and learns from the sweep's runs there, leaving the host's own cache
unchanged.

Usage: ``python scripts/sweep.py [--workers 1 2 4] [--vcpus 128 512] [--devices 0 2]
[--device-size 32MiB] [--firmware-ms 100] [--backend auto|kvm|sim-vcpu] [--rounds 3]
[--out sweep-out]``. The defaults take a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from hostinfo import SideCpus, host_info, side_cpus  # noqa: E402

from devstate.config.fields import parse_quantity  # noqa: E402
from devstate.config.params import MigrationParams, Schedule  # noqa: E402
from devstate.config.spec import MachineConfig, parse_spec  # noqa: E402
from devstate.errors import DevstateError, SpecError  # noqa: E402

COLUMNS = ("round", "vcpus", "devices", "device_bytes", "firmware_ms", "backend", "mode",
           "workers", "source_cpus", "dest_cpus", "oversubscribed", "downtime_ms",
           "expected_ms", "verified", "total_bytes", "wall_s", "critical_path", "error")


@dataclass(frozen=True, slots=True)
class Point:
    """One migration of the sweep: a machine, a worker count and a mode."""

    vcpus: int
    devices: int
    workers: int
    schedule: Schedule

    @property
    def mode(self) -> str:
        """``concurrent``, or ``sequential`` for the baseline."""
        return str(self.schedule)


def grid(vcpus: list[int], devices: list[int], workers: list[int]) -> list[Point]:
    """One round's points: per (vCPUs, devices) the sequential baseline, then each count."""
    points = []
    for v, d in itertools.product(vcpus, devices):
        points.append(Point(v, d, 1, Schedule.SEQUENTIAL))
        points.extend(Point(v, d, w, Schedule.CONCURRENT) for w in workers)
    return points


def choose_backend(name: str) -> tuple[str, str]:
    """The vCPU backend for ``auto``/``kvm``/``sim-vcpu`` and why; kvm must be usable."""
    if name == "sim-vcpu":
        return "sim-vcpu", "asked for"
    from devstate.cli import kvm_usable

    usable, why = kvm_usable()
    if name == "kvm" and not usable:
        raise SystemExit(f"sweep: --backend kvm, but {why}")
    return ("kvm" if usable else "sim-vcpu"), why


def machine(point: Point, backend: str, device_bytes: int, firmware_ms: float) -> MachineConfig:
    """The machine of a point: its vCPUs and ``devices`` equal VFIO-style devices."""
    return parse_spec({
        "name": f"sweep-{point.vcpus}v-{point.devices}d", "seed": 7,
        "vcpus": {"count": point.vcpus, "backend": backend},
        "devices": [{"name": f"dev{i}", "size": device_bytes,
                     "firmware_latency_ms": firmware_ms} for i in range(point.devices)],
    })


def pinned_params(point: Point, sides: SideCpus) -> tuple[MigrationParams, MigrationParams]:
    """The source's and the destination's params, each pinned to its own half.

    ``migrate_locally`` hands the destination ``dest_cpus(dest_params)``; this checks
    that those are exactly the second half, so a change there cannot quietly put both
    sides on the same CPUs.
    """
    from devstate.migration.local import dest_cpus

    source = MigrationParams(workers=point.workers, schedule=point.schedule, cpus=sides.source)
    dest = MigrationParams(workers=point.workers, schedule=point.schedule, cpus=sides.dest)
    if sorted(dest_cpus(dest)) != sorted(sides.dest):
        raise AssertionError(f"the destination would run on {dest_cpus(dest)}, "
                             f"not on {list(sides.dest)}")
    return source, dest


def run_point(point: Point, spec: MachineConfig, sides: SideCpus, costs: Path) -> dict[str, Any]:
    """Migrate once; the CSV row's measured fields (``error`` set if it failed)."""
    import uvloop

    from devstate.migration.local import migrate_locally
    from devstate.planning.cost import CostHistory

    source, dest = pinned_params(point, sides)
    start = time.perf_counter()
    try:
        report = uvloop.run(migrate_locally(spec, source, dest_params=dest,
                                            history=CostHistory(costs)))
    except (DevstateError, OSError, TimeoutError) as exc:  # a failed point, not the run
        return {"verified": False, "wall_s": round(time.perf_counter() - start, 3),
                "error": f"{type(exc).__name__}: {exc}"}
    return {"downtime_ms": round(report.downtime_ms, 3),
            "expected_ms": round(report.expected_ms, 3), "verified": report.verified,
            "total_bytes": report.total_bytes, "critical_path": report.critical_path,
            "wall_s": round(time.perf_counter() - start, 3), "error": ""}


def seed_costs(out: Path) -> Path:
    """A private copy of this host's cost constants for the sweep to read and refine."""
    from devstate.planning.cost import CostHistory

    private = out / "costs.json"
    host = CostHistory().path
    if host.exists() and not private.exists():
        shutil.copyfile(host, private)
    return private


class CsvLog:
    """``sweep.csv``, one row per finished migration, flushed at once (Ctrl-C keeps it)."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, COLUMNS)
        self._writer.writeheader()
        self.rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (missing columns empty) and flush it to disk."""
        full = {c: row.get(c, "") for c in COLUMNS}
        self._writer.writerow(full)
        self._file.flush()
        self.rows.append(full)

    def close(self) -> None:
        """Close the file; a second call does nothing."""
        self._file.close()


def sweep(args: argparse.Namespace, sides: SideCpus, log: CsvLog,
          progress: Progress) -> None:
    """Run every point of every round, logging each; raises KeyboardInterrupt on Ctrl-C."""
    points = grid(args.vcpus, args.devices, args.workers)
    costs = seed_costs(args.out)
    for rnd, point in itertools.product(range(1, args.rounds + 1), points):
        progress.starting(rnd, point)
        spec = machine(point, args.backend, args.device_size, args.firmware_ms)
        row = {"round": rnd, "vcpus": point.vcpus, "devices": point.devices,
               "device_bytes": args.device_size, "firmware_ms": args.firmware_ms,
               "backend": args.backend, "mode": point.mode, "workers": point.workers,
               "source_cpus": _cpus(sides.source), "dest_cpus": _cpus(sides.dest),
               "oversubscribed": point.workers > sides.per_side,
               **run_point(point, spec, sides, costs)}
        log.write(row)
        progress.finished(row)


def _cpus(cpus: tuple[int, ...]) -> str:
    return " ".join(map(str, cpus))


class Progress:
    """One rich progress line on a terminal; off a terminal, a plain line per point."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.console = Console(stderr=True)
        self._bar = Bar(TextColumn("{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[last]}"), console=self.console,
                        disable=not self.console.is_terminal)
        self._task = self._bar.add_task("sweep", total=total, last="")

    def __enter__(self) -> Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def starting(self, rnd: int, point: Point) -> None:
        """Show the point now running."""
        self._bar.update(self._task, description=f"round {rnd}: {_label(point)}")

    def finished(self, row: dict[str, Any]) -> None:
        """Count a finished point and show (or, off a terminal, print) its result."""
        said = (f"failed: {row['error']}" if row["error"]
                else f"{row['downtime_ms']:.1f} ms" + ("" if row["verified"] else " UNVERIFIED"))
        self._bar.update(self._task, advance=1, last=f"last: {said}")
        if not self.console.is_terminal:
            print(f"round {row['round']}: {row['vcpus']} vCPUs, {row['devices']} devices, "
                  f"{row['mode']} x{row['workers']}: {said}", file=sys.stderr, flush=True)


def _label(point: Point) -> str:
    return (f"{point.vcpus} vCPUs, {point.devices} dev, "
            + (f"{point.workers} workers" if point.schedule is Schedule.CONCURRENT
               else "sequential"))


def medians(rows: list[dict[str, Any]]) -> dict[tuple[int, int, str, int], list[float]]:
    """Downtimes of the successful rows by (vCPUs, devices, mode, workers)."""
    out: dict[tuple[int, int, str, int], list[float]] = {}
    for row in rows:
        if row["error"] == "" and row["downtime_ms"] != "":
            key = (int(row["vcpus"]), int(row["devices"]), row["mode"], int(row["workers"]))
            out.setdefault(key, []).append(float(row["downtime_ms"]))
    return out


def pairs(samples: dict[tuple[int, int, str, int], list[float]]) -> list[tuple[int, int]]:
    """The (vCPUs, devices) pairs that have any sample, in order."""
    return sorted({(v, d) for v, d, _, _ in samples})


def series(samples: dict[tuple[int, int, str, int], list[float]], v: int,
           d: int) -> Iterator[tuple[int, list[float]]]:
    """(workers, downtimes) of the concurrent points of one pair, by worker count."""
    for (sv, sd, mode, w), values in sorted(samples.items()):
        if (sv, sd, mode) == (v, d, "concurrent"):
            yield w, values


def plot_downtime(samples: dict[tuple[int, int, str, int], list[float]], per_side: int,
                  path: Path) -> None:
    """Downtime against workers, a panel per (vCPUs, devices), baseline dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = pairs(samples)
    cols = min(3, len(keys)) or 1
    rows = -(-len(keys) // cols) or 1
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (v, d) in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        points = list(series(samples, v, d))
        if points:
            ws = [w for w, _ in points]
            mid = [statistics.median(x) for _, x in points]
            err = [[m - min(x) for m, (_, x) in zip(mid, points, strict=True)],
                   [max(x) - m for m, (_, x) in zip(mid, points, strict=True)]]
            ax.errorbar(ws, mid, yerr=err, marker="o", capsize=3, label="concurrent")
            over = [(w, m) for w, m in zip(ws, mid, strict=True) if w > per_side]
            if over:
                ax.scatter(*zip(*over, strict=True), s=90, facecolors="none",
                           edgecolors="red", label="oversubscribed", zorder=3)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ws, [str(w) for w in ws])
        seq = samples.get((v, d, "sequential", 1))
        if seq:
            ax.axhline(statistics.median(seq), linestyle="--", color="gray",
                       label="sequential")
        ax.set_title(f"{v} vCPUs, {d} devices", fontsize=10)
        ax.set_xlabel("workers per side")
        ax.set_ylabel("downtime (ms)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def plot_speedup(samples: dict[tuple[int, int, str, int], list[float]], per_side: int,
                 path: Path) -> bool:
    """Sequential median / concurrent median against workers; False if nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn, workers = False, set()
    for v, d in pairs(samples):
        seq = samples.get((v, d, "sequential", 1))
        points = list(series(samples, v, d))
        if not seq or not points:
            continue
        base = statistics.median(seq)
        workers.update(w for w, _ in points)
        ax.plot([w for w, _ in points], [base / statistics.median(x) for _, x in points],
                marker="o", label=f"{v} vCPUs, {d} devices")
        drawn = True
    if not drawn:
        return False
    ax.axhline(1.0, color="gray", linestyle=":", label="no gain")
    if max(workers) > per_side:
        ax.axvspan(per_side, max(workers), color="red", alpha=0.08,
                   label=f"oversubscribed (> {per_side} CPU(s) per side)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(workers), [str(w) for w in sorted(workers)])
    ax.set_xlabel("workers per side")
    ax.set_ylabel("speedup over sequential (x)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return True


def summary(samples: dict[tuple[int, int, str, int], list[float]], per_side: int) -> str:
    """A plain table of medians and speedups."""
    lines = [f"{'vCPUs':>6} {'devices':>7} {'mode':<10} {'workers':>7} {'median ms':>10} "
             f"{'runs':>4} {'speedup':>7}"]
    for (v, d, mode, w), values in sorted(samples.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2] != "sequential", kv[0][3])):
        mid = statistics.median(values)
        seq = samples.get((v, d, "sequential", 1))
        speed = f"{statistics.median(seq) / mid:.2f}x" if seq and mode == "concurrent" else ""
        flag = " oversubscribed" if mode == "concurrent" and w > per_side else ""
        lines.append(f"{v:>6} {d:>7} {mode:<10} {w:>7} {mid:>10.1f} {len(values):>4} "
                     f"{speed:>7}{flag}")
    return "\n".join(lines)


def _size(text: str) -> int:
    try:
        return parse_quantity(text, "--device-size")
    except SpecError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _vcpus(text: str) -> int:
    from devstate.config.spec import MAX_VCPUS

    value = _positive(text)
    if value > MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_VCPUS} (devstate's spec limit)")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=_positive, nargs="+", default=[1, 2, 4])
    p.add_argument("--vcpus", type=_vcpus, nargs="+", default=[128, 512])
    p.add_argument("--devices", type=_count, nargs="+", default=[0, 2])
    p.add_argument("--device-size", type=_size, default=32 << 20)
    p.add_argument("--firmware-ms", type=float, default=100.0)
    p.add_argument("--backend", choices=("auto", "kvm", "sim-vcpu"), default="auto")
    p.add_argument("--rounds", type=_positive, default=3)
    p.add_argument("--out", type=Path, default=Path("sweep-out"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; 0 when every point migrated and verified, 1 if any did not, 130 on ^C."""
    args = parse_args(argv)
    args.backend, why = choose_backend(args.backend)
    args.out.mkdir(parents=True, exist_ok=True)
    sides = side_cpus()
    host = host_info()
    host["sweep"] = {
        "workers": args.workers, "vcpus": args.vcpus, "devices": args.devices,
        "device_bytes": args.device_size, "firmware_ms": args.firmware_ms,
        "rounds": args.rounds, "backend": args.backend, "backend_reason": why,
        "source_cpus": list(sides.source), "dest_cpus": list(sides.dest),
        "cpu_split": sides.note, "pinned": "workers only; coordinators unpinned"}
    (args.out / "host.json").write_text(json.dumps(host, indent=2) + "\n")
    print(f"vCPU backend: {args.backend} ({why})\npinning: {sides.note}", flush=True)
    log = CsvLog(args.out / "sweep.csv")
    total = args.rounds * len(grid(args.vcpus, args.devices, args.workers))
    interrupted = False
    try:
        with Progress(total) as progress:
            sweep(args, sides, log, progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        log.close()
    return report(args.out, log.rows, sides, interrupted)


def report(out: Path, rows: list[dict[str, Any]], sides: SideCpus, interrupted: bool) -> int:
    """Draw the plots, print the summary; the exit code."""
    samples = medians(rows)
    pictures = []
    if samples:
        plot_downtime(samples, sides.per_side, out / "downtime.png")
        pictures.append("downtime.png")
        if plot_speedup(samples, sides.per_side, out / "speedup.png"):
            pictures.append("speedup.png")
        print(summary(samples, sides.per_side))
    bad = [r for r in rows if r["error"] or not r["verified"]]
    if bad:
        print(f"{len(bad)} of {len(rows)} migrations failed or were not verified "
              "(see the error column)")
    if interrupted:
        print(f"interrupted: {len(rows)} finished rows kept", file=sys.stderr)
    print(f"wrote {out / 'sweep.csv'} ({len(rows)} rows), {out / 'host.json'}"
          + "".join(f", {out / p}" for p in pictures))
    return 130 if interrupted else (1 if bad else 0)


if __name__ == "__main__":
    sys.exit(main())
