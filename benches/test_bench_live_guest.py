"""A live guest's stop->resume, sequential against concurrent, and each side's memory.

The machine: the built-in default (``devstate/config/machines/default.toml``: 256 MiB of
guest RAM, four vfio-sim devices) with 288 KVM vCPUs instead of 512, so a live guest whose
vCPUs execute the guest program until the stop, its RAM moving as ``ram/0..7``. Each round
migrates it twice, ``sequential`` (one worker, one device at a time: what VMMs do) and
``concurrent`` (devstate's defaults), in alternating order so that neither always runs
just after the other's teardown; every migration goes through
:func:`benches.verified.migrate_verified` (digests compared on both sides, the guest must
have continued). ``extra_info``: each variant's median downtime (``report.downtime_ms``,
stop to resume) beside the cost model's estimate (``report.expected_ms``), the
``sequential_over_concurrent`` ratio, the bytes moved, and whether the guest continued.

Memory (benchmarks enabled only): after the timed rounds, one more migration per variant
with :class:`MemorySampler` polling every process of both sides (the destination process
is a child of this one, so its tree is reachable too) from ``/proc/PID/smaps_rollup`` and
``/proc/PID/status`` every :data:`SAMPLE_INTERVAL_S`. That polling competes for the 2
cores and this process's GIL with the source coordinator, so those migrations' downtimes
are reported apart (``downtime_ms_while_sampled``) and never mixed into the medians. The
groups: each side's VMM processes (coordinator, forkserver, resource tracker, workers;
the source coordinator is this pytest process) and, apart, each side's device models (the
simulated devices' "hardware", not the VMM's memory). The budget of the issue's target is
guest RAM + the arena (:func:`arena_layout`'s total, which depends on the worker count).

How to read the figures. The guest RAM is one memfd that a side's coordinator and every
worker map (MAP_SHARED, pre-faulted), and the arena is one shm segment they all map.
``rss`` sums count those pages once per process that maps them (so a side's RSS overstates
it by up to the RAM once per extra mapper); ``pss`` divides each page among its mappers;
``uss`` counts a page as private while only one process maps it (before the workers attach,
after they exit), so its peak can hold the whole RAM. ``pss_anon``/``pss_file``/
``pss_shmem`` split PSS; ``pss_shmem`` is RAM + arena, except that a sample reads the
processes one after another, so a worker attaching mid-sample makes that sample's sum
overcount the shared pages (seen: 9 to 21 MiB over, in a single sample, while every other
sample reads exactly RAM + arena). Hence the robust figures: ``rss_shmem_max`` (the largest
RssShmem of one process: the coordinator maps all of RAM and arena, so it is the side's
shared memory counted once) and ``footprint`` (per sample, ``pss_anon + pss_file +
rss_shmem_max``: the side's memory). ``shmem_over_budget`` and ``footprint_over_budget``
hold those against the budget. ``rss_hwm_sum`` adds each process's kernel-kept peak RSS
(VmHWM: exact per process whatever the sampling rate, but peaks at different instants and
shared pages once per process, an upper bound). Every figure is the peak over the samples,
in MiB.

Run: ``python -m pytest benches/test_bench_live_guest.py --benchmark-only``. Each
migration takes several seconds (pool start, the destination process, RAM pre-faulting),
so the rounds are few.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

import psutil
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from benches.conftest import median_s
from benches.verified import migrate_verified
from devstate.cli import kvm_usable, load_default_machine
from devstate.config.params import MigrationParams, Schedule
from devstate.config.spec import Backend, MachineConfig
from devstate.devices import device_table
from devstate.report.migration import MigrationReport
from devstate.worker.layout import arena_layout

USABLE, WHY = kvm_usable()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"needs KVM: {WHY}")

VCPUS = 288
# Each migration takes several seconds (sequential more): 3 rounds of both take about half
# a minute on this host (then two sampled ones), enough for a median of 3 interleaved
# samples each.
ROUNDS = 3
VARIANTS = {
    "sequential": MigrationParams(workers=1, schedule=Schedule.SEQUENTIAL),
    "concurrent": MigrationParams(),
}
# One sample reads two small /proc files per process (about 20 processes for both sides):
# tens of ms on this loaded 2-core host. 100 ms keeps the sampler well under a core while
# still seeing every phase of a migration that lasts seconds; VmHWM covers what falls
# between two samples, per process.
SAMPLE_INTERVAL_S = 0.1
MIB = 1 << 20


def live_machine() -> MachineConfig:
    """The default machine (256 MiB of RAM, 4 vfio-sim devices) with 288 vCPUs."""
    default = load_default_machine()
    assert default.ram is not None and default.vcpus.backend is Backend.KVM, \
        "the default machine is no longer a live KVM guest: this bench measures one"
    machine: MachineConfig = dataclasses.replace(
        default, name=f"live-{VCPUS}-default",
        vcpus=dataclasses.replace(default.vcpus, count=VCPUS))
    return machine


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    """One process's memory at one instant, in bytes: from ``smaps_rollup`` (PSS split
    into anon, file and shmem) and ``status`` (``rss_shmem``: the shmem pages it maps,
    whole; ``hwm``: its peak RSS so far, VmHWM)."""

    rss: int
    pss: int
    uss: int
    pss_anon: int
    pss_file: int
    pss_shmem: int
    rss_shmem: int
    hwm: int


# The fields summed over a side's processes at each sample.
SUMMED = ("rss", "pss", "uss", "pss_anon", "pss_file", "pss_shmem")


def read_memory(pid: int) -> ProcessMemory | None:
    """``pid``'s memory, or None if it is gone (or not ours to read).

    Read straight from ``/proc/PID/smaps_rollup``, the file psutil's ``memory_full_info``
    reads too, because it also splits PSS into anon, file and shmem: the shmem share is
    the guest RAM and the arena, which is what the memory target is about.
    """
    rollup = _kb_fields(f"/proc/{pid}/smaps_rollup")
    status = _kb_fields(f"/proc/{pid}/status")
    if rollup is None or status is None:
        return None
    return ProcessMemory(
        rss=rollup.get("Rss", 0), pss=rollup.get("Pss", 0),
        uss=rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
        pss_anon=rollup.get("Pss_Anon", 0), pss_file=rollup.get("Pss_File", 0),
        pss_shmem=rollup.get("Pss_Shmem", 0), rss_shmem=status.get("RssShmem", 0),
        hwm=status.get("VmHWM", 0))


def _kb_fields(path: str) -> dict[str, int] | None:
    """The ``Name: N kB`` lines of a /proc file, in bytes; None if the process is gone."""
    fields: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if rest.endswith("kB\n"):
                    fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):  # exited between the listing and the read
        return None
    return fields


def _cmdline(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())
    return ""


def _is_destination(cmdline: str) -> bool:
    """The destination process: ``python -m devstate vm ... --incoming URI``."""
    return "devstate" in cmdline and " vm " in cmdline and "--incoming" in cmdline


def _is_device_model(cmdline: str) -> bool:
    return "devstate.devices.vfio.model" in cmdline


class MemorySampler:
    """Polls every process of both sides of a local migration from a thread; keeps, per
    group (``source``, ``destination``, and each side's ``devices``), the peak of each
    summed field, and every process's last VmHWM.

    A context manager: sampling runs between enter and exit. The source side is this
    process and its descendants outside the destination's tree; the destination side is
    the destination process and its descendants; device models (vfio-sim) are counted
    apart on each side.
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._cmdlines: dict[int, str] = {}  # pids are not reused within one migration
        self.peaks: dict[str, dict[str, int]] = {}
        self.hwm: dict[str, dict[int, int]] = {}
        self.samples = 0

    def __enter__(self) -> MemorySampler:
        # This process's VmHWM would otherwise hold the peak of every earlier migration
        # of the run ("5" resets it: Documentation/filesystems/proc.rst, clear_refs).
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval_s)

    def _groups(self) -> Iterator[tuple[str, int]]:
        """(group, pid) of every process of the migration, as of now."""
        trees: list[tuple[str, list[psutil.Process]]] = [("source", [self._me])]
        with contextlib.suppress(psutil.Error):
            for child in self._me.children():
                with contextlib.suppress(psutil.Error):
                    side = "destination" if _is_destination(self._command(child)) \
                        else "source"
                    trees.append((side, [child, *child.children(recursive=True)]))
        for side, procs in trees:
            for proc in procs:
                model = _is_device_model(self._command(proc))
                yield (f"{side}-devices" if model else side), proc.pid

    def _command(self, proc: psutil.Process) -> str:
        if proc.pid not in self._cmdlines:
            self._cmdlines[proc.pid] = _cmdline(proc)
        return self._cmdlines[proc.pid]

    def _sample(self) -> None:
        sums: dict[str, dict[str, int]] = {}
        for group, pid in self._groups():
            mem = read_memory(pid)
            if mem is None:
                continue
            total = sums.setdefault(group, dict.fromkeys((*SUMMED, "rss_shmem_max"), 0))
            for name in SUMMED:
                total[name] += getattr(mem, name)
            total["rss_shmem_max"] = max(total["rss_shmem_max"], mem.rss_shmem)
            self.hwm.setdefault(group, {})[pid] = mem.hwm
        for group, total in sums.items():
            # The side's footprint at this instant, immune to the attach race (see the
            # module docstring): private and file pages by PSS, the shared memory once,
            # as the process that maps all of it (the coordinator: RAM and arena) has it.
            total["footprint"] = total["pss_anon"] + total["pss_file"] + total["rss_shmem_max"]
            peak = self.peaks.setdefault(group, dict(total))
            for name, value in total.items():
                peak[name] = max(peak[name], value)
        self.samples += 1

    def summary(self) -> dict[str, dict[str, float]]:
        """Per group, the peak of each summed field and the sum of VmHWMs, in MiB."""
        return {group: {**{f"{k}_mib": round(v / MIB, 1) for k, v in peak.items()},
                        "rss_hwm_sum_mib": round(sum(self.hwm[group].values()) / MIB, 1),
                        "processes": len(self.hwm[group])}
                for group, peak in sorted(self.peaks.items())}


def migrate_live(spec: MachineConfig, params: MigrationParams) -> MigrationReport:
    """One verified migration whose guest must have continued with every vCPU running."""
    report = migrate_verified(spec, params)
    assert report.guest is not None, f"{spec.name}: no guest block: not a live guest?"
    assert report.guest.vcpus_running == spec.vcpus.count, report.guest.describe()
    return report


def memory_pass(spec: MachineConfig, params: MigrationParams) -> dict[str, object]:
    """One more migration with the sampler on: its peaks per side beside the budget."""
    assert spec.ram is not None
    arena = arena_layout(params, device_table(spec)).total_bytes
    with MemorySampler() as sampler:
        report = migrate_live(spec, params)
    summary = sampler.summary()
    budget = spec.ram.size + arena
    for side in ("source", "destination"):
        if side in summary:
            got = summary[side]
            # The target's figure: the shared memory (guest RAM memfd + arena) against the
            # budget; the footprint beside it adds the interpreters' own pages.
            got["shmem_over_budget"] = round(got["rss_shmem_max_mib"] * MIB / budget, 3)
            got["footprint_over_budget"] = round(got["footprint_mib"] * MIB / budget, 3)
    return {"ram_mib": round(spec.ram.size / MIB, 1), "arena_mib": round(arena / MIB, 1),
            "budget_mib": round(budget / MIB, 1), "samples": sampler.samples,
            "downtime_ms_while_sampled": round(report.downtime_ms, 1), **summary}


def test_live_guest_288_sequential_vs_concurrent(benchmark: BenchmarkFixture) -> None:
    """Stop->resume of the live 288-vCPU guest, both schedules interleaved per round."""
    benchmark.group = "live-guest-288"
    spec = live_machine()
    reports: dict[str, list[MigrationReport]] = {name: [] for name in VARIANTS}
    rounds_done = 0

    def one_round() -> None:
        nonlocal rounds_done
        order = list(VARIANTS) if rounds_done % 2 == 0 else list(reversed(VARIANTS))
        rounds_done += 1
        for name in order:
            reports[name].append(migrate_live(spec, VARIANTS[name]))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)  # type: ignore[no-untyped-call]
    info = benchmark.extra_info
    downtime = {k: statistics.median(r.downtime_ms for r in v) for k, v in reports.items()}
    expected = {k: statistics.median(r.expected_ms for r in v) for k, v in reports.items()}
    info["median_downtime_ms"] = {k: round(v, 1) for k, v in downtime.items()}
    info["median_expected_ms"] = {k: round(v, 1) for k, v in expected.items()}
    info["downtimes_ms"] = {k: [round(r.downtime_ms, 1) for r in v] for k, v in reports.items()}
    info["downtime_over_expected"] = {k: round(downtime[k] / expected[k], 3)
                                      for k in VARIANTS if expected[k]}
    info["sequential_over_concurrent"] = round(downtime["sequential"] / downtime["concurrent"], 3)
    info["expected_sequential_over_concurrent"] = round(
        expected["sequential"] / expected["concurrent"], 3)
    first = reports["concurrent"][0]
    assert first.guest is not None
    info["bytes_moved"] = first.total_bytes
    info["ram_bytes"] = first.guest.ram_bytes
    info["guest_continued"] = {k: all(r.guest is not None and r.guest.continued for r in v)
                               for k, v in reports.items()}
    info["vcpus_running"] = {k: min(r.guest.vcpus_running for r in v if r.guest)
                             for k, v in reports.items()}
    # Both schedules move the same state: a difference means one skipped something. RAM
    # apart: the concurrent schedule precopies it, re-sending what the guest dirtied, and
    # either sends a run of zero pages as a header alone; every range of both is compared
    # by digest (migrate_verified), and both sent some of it.
    def state(report: MigrationReport) -> int:
        return sum(d.bytes for d in report.devices if not d.id.startswith("ram/"))

    assert {state(r) for v in reports.values() for r in v} == {state(first)}
    assert all(d.verified and d.bytes > 0 for v in reports.values() for r in v
               for d in r.devices if d.id.startswith("ram/"))
    if median_s(benchmark) is not None:  # real rounds, not CI's --benchmark-disable
        info["memory"] = {name: memory_pass(spec, params) for name, params in VARIANTS.items()}
        info["memory_how"] = (
            f"one extra migration per variant, every process sampled each "
            f"{SAMPLE_INTERVAL_S} s from /proc/PID/smaps_rollup and status; per side the peak "
            "of the sums; the source coordinator is this pytest process; shared guest RAM "
            "(memfd) and arena: rss counts them once per mapping process, pss splits them, "
            "rss_shmem_max counts them once; footprint = pss_anon + pss_file + "
            "rss_shmem_max; budget = RAM + arena; device models apart")
