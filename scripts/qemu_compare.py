#!/usr/bin/env python3
"""devstate's downtime next to QEMU's, on this machine, for the same vCPU counts.

What it does, per vCPU count and round: starts a source QEMU and a destination QEMU
(``-incoming defer``), minimal guests with no disk, no NIC and no display (``-machine
q35,accel=kvm -cpu host -m 64 -nodefaults``), each with a QMP socket, and drives them with
QEMU's own client (``qemu.qmp.QMPClient``): the ``events`` capability on, a downtime limit
so large that QEMU switches over after its first pass, ``migrate-incoming`` on the
destination, ``cont`` and then ``migrate`` on the source, both over a Unix socket. It reads
two numbers: QEMU's own ``downtime`` from ``query-migrate`` on the source, and the end-to-end
stop-to-resume time from QMP events, the source's ``STOP`` to the destination's ``RESUME``
(both timestamps are the host's wall clock). Then devstate migrates a machine with the same
vCPUs (kvm backend when /dev/kvm is usable, no VFIO devices: the QEMU guests have none)
between two local processes, and both are written side by side.

What the comparison measures: the stop-and-copy of a small VM's vCPU and platform state on
each stack, source stop to destination resume, on one host. QEMU's switchover also carries
its guest RAM dirtied since the last pass and its chipset devices, and syncs its dirty
bitmap; the guest RAM is kept tiny (``--memory``, default 64 MiB, SeaBIOS idling in a halt
loop dirties almost nothing) so that RAM does not dominate. QEMU's ``downtime`` field is
the source's view (stop to the source's completion); stop-to-resume includes the
destination's load and is the number devstate's ``downtime_ms`` corresponds to. Both
stacks have the same shape: one KVM VM per side, its vCPUs driven by the one process that
owns it (devstate's native engine on the side's CPUs). devstate compares every vCPU's
digest on both sides after the resume, which QEMU does not.

What it does not measure: RAM-heavy guests, precopy convergence under a guest that
dirties its RAM (``--live`` compares at dirty rate 0, below), real devices (virtio, VFIO),
a network between hosts, QEMU's multifd, or process start-up (neither side's).

``--live``: devstate's side migrates a *live* guest instead of bare vCPU state: a spec
with ``[ram] size`` equal to QEMU's ``--memory`` and ``dirty_rate = 0``, whose vCPUs
execute devstate's guest program in that RAM (a memfd) until the stop and go on from where
they stopped on the destination, which checks it from the guest's own RAM; each row then
carries the report's ``guest`` block (``devstate_guest_continued``,
``devstate_guest_vcpus_running``) and a guest that did not continue is an error. The two
guests are not running the same program, so they are **compared at dirty rate 0**:

* QEMU's guest is SeaBIOS with no boot device. At POST, SeaBIOS wakes every AP once
  (INIT-SIPI-SIPI) to count it and load its MTRRs, after which each AP sits in a
  ``hlt`` loop with interrupts off for good (its debug log: "Found 288 cpu(s)"); the BSP
  fails to boot ("No bootable device.") and halts waiting for interrupts. By the time of
  the migration every vCPU is halted and the RAM is all but untouched: it dirties almost
  nothing.
* devstate's guest at ``dirty_rate = 0``: every vCPU executing the guest program (long
  mode, its loop of checks and checksums), halting between its 50 ms LAPIC timer ticks
  (``devstate/devices/kvm/guest.py``); it writes only its control pages (each vCPU's
  counter and checksum blocks), none of the rest of its RAM.

Running devstate's guest program in QEMU instead (as a multiboot image) was not done: its
long-mode set-up and its APs' start-up are done by devstate's host side, not by code in the
image (the host writes the page tables, GDT, IDT and code into the RAM and puts every vCPU,
APs too, straight into long mode through KVM's register ioctls, no INIT/SIPI:
``devstate/devices/kvm/guest.py``), so QEMU could not boot it as it is. Hence dirty rate 0
on both sides, the closest to like work.

The RAM moves the same way on both: precopied while the guest runs, the downtime carrying
only the last dirty pages. QEMU sends all of its RAM in its first pass (zero pages as a
flag, so an untouched RAM is little on the wire), then, its downtime limit being huge,
switches over with what the guest dirtied since. devstate precopies too (KVM's dirty log,
rounds of dirty pages through the worker pool: docs/live-guest.md): round 1 sends every
page, every byte (no zero-page flag, so ``devstate_ram_transferred_bytes`` is at least the
RAM), each later round the pages the guest dirtied during the one before; it switches over
at the end of a round once its cost model puts the downtime under its limit (no limit is
set here, so QEMU's default 300 ms), and its stop-and-copy moves the last round's pages
(``devstate_ram_stop_copy_bytes``: the control pages) with the vCPU state, as the stream
devices ``ram/0..k``. Each live row carries the RAM figures of both: QEMU's
``qemu_total_ms`` (``query-migrate``'s ``total-time``: the migrate command to completion,
its ``setup-time`` included) and ``qemu_ram_bytes`` (``ram.transferred``, every pass);
devstate's precopy rounds, ``devstate_ram_transferred_bytes`` (every round and the
stop-and-copy), ``devstate_ram_stop_copy_bytes``, ``devstate_ram_precopy_ms`` (dirty log
on to the stop), ``devstate_total_ms`` (precopy plus downtime: dirty log on to the
resume, the figure beside QEMU's total-time; the data channels' set-up before it is not
in it) and ``devstate_wall_ms`` (the whole ``migrate_locally`` call, starting the
destination process and both worker pools and pre-faulting the RAM on both sides, which
QEMU's figures never include: its processes were started before).

Pinning: as ``sweep.py``, the source (QEMU's whole process, or devstate's workers) on the
first half of the usable CPUs and the destination on the second half.

If ``qemu-system-x86_64`` is not installed this says how to install it and exits 0 (it is
a comparison, not a dependency); likewise without a usable /dev/kvm.

Usage: ``python scripts/qemu_compare.py [--vcpus 64 128 256] [--rounds 3] [--memory 64]
[--live] [--workers N] [--cpu host,-arch-capabilities] [--settle 1.0]
[--out qemu-compare-out]``; e.g. ``--vcpus 64 --rounds 1 --memory 1024 --live``.
Counts beyond QEMU's q35 ``-smp`` maximum (288 in QEMU 7.2, probed at start) run devstate
alone, with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from hostinfo import SideCpus, host_info, side_cpus  # noqa: E402

QEMU_BINARY = "qemu-system-x86_64"
INSTALL_HINT = ("QEMU is not installed, so there is nothing to compare with.\n"
                "Install it with:  apt-get install qemu-system-x86   (Debian/Ubuntu)\n"
                "              or:  dnf install qemu-system-x86      (Fedora)\n"
                "then run this again. devstate itself does not need QEMU.")
# QEMU's downtime-limit maximum is 2000 s (MAX_MIGRATE_DOWNTIME_SECONDS): any pending RAM
# fits in it, so the source stops right after its first pass.
DOWNTIME_LIMIT_MS = 2_000_000
# Start-up of a guest with hundreds of vCPUs on a busy nested host takes seconds.
QMP_READY_TIMEOUT_S = 60.0
MIGRATION_TIMEOUT_S = 120.0
QUIT_TIMEOUT_S = 10.0
# A nested AMD host refuses MSR 0x10a (IA32_ARCH_CAPABILITIES), which ``-cpu host`` sets
# at vCPU reset ("failed to set MSR 0x10a"); the guest does not need it.
DEFAULT_CPU = "host,-arch-capabilities"

COLUMNS = ("round", "vcpus", "qemu_downtime_ms", "qemu_stop_to_resume_ms", "qemu_total_ms",
           "qemu_setup_ms", "qemu_ram_bytes", "devstate_downtime_ms", "devstate_expected_ms",
           "devstate_verified", "devstate_backend", "devstate_workers", "devstate_live",
           "devstate_bytes", "devstate_guest_continued", "devstate_guest_vcpus_running",
           "devstate_ram_rounds", "devstate_ram_transferred_bytes",
           "devstate_ram_stop_copy_bytes", "devstate_ram_precopy_ms", "devstate_total_ms",
           "devstate_wall_ms", "note", "error")


class QemuError(Exception):
    """A QEMU process failed or a migration between two of them did not complete."""


@dataclass(frozen=True, slots=True)
class QemuMigration:
    """What one QEMU migration reported, in ms (``total_ms``: ``total-time``, the migrate
    command to completion; ``ram_bytes``: ``ram.transferred``, RAM moved, all passes)."""

    downtime_ms: float
    stop_to_resume_ms: float
    total_ms: float
    setup_ms: float
    ram_bytes: int


def qemu_max_cpus(qemu: str) -> int | None:
    """The q35 machine's ``-smp`` maximum, from QEMU's own refusal of an absurd count."""
    try:
        done = subprocess.run([qemu, "-machine", "q35", "-smp", "1000000", "-display", "none",
                               "-nodefaults"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"max CPUs supported by machine '[^']*' is (\d+)", done.stderr)
    return int(found.group(1)) if found else None


def qemu_command(qemu: str, vcpus: int, args: argparse.Namespace, qmp: Path, *,
                 incoming: bool) -> list[str]:
    """The command line of a minimal guest: no disk, NIC or display; QMP on ``qmp``."""
    return [qemu, "-machine", "q35,accel=kvm", "-cpu", args.cpu, "-smp", str(vcpus),
            "-m", str(args.memory), "-nodefaults", "-display", "none", "-no-user-config",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            *(["-incoming", "defer"] if incoming else ["-S"])]


@contextlib.asynccontextmanager
async def qemu_process(command: list[str], qmp_path: Path, cpus: Sequence[int],
                       log: Path) -> AsyncIterator[Any]:
    """Start QEMU pinned to ``cpus``; yield a connected QMPClient; quit and reap it after."""
    from qemu.qmp import QMPClient

    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    qmp = QMPClient(qmp_path.stem)
    try:
        await _connect(qmp, qmp_path, proc, log)
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(QUIT_TIMEOUT_S):
                await qmp.execute("quit")
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        await _reap(proc)


async def _connect(qmp: Any, path: Path, proc: asyncio.subprocess.Process, log: Path) -> None:
    """Connect once QEMU's socket is there; a QEMU that exits first raises its error."""
    from qemu.qmp import QMPError

    last: BaseException | None = None
    try:
        async with asyncio.timeout(QMP_READY_TIMEOUT_S):
            while True:
                if proc.returncode is not None or await _exited(proc):
                    raise QemuError(f"QEMU ({log.stem}) exited with {proc.returncode}: "
                                    f"{_tail(log)}")
                if path.exists():
                    try:
                        await qmp.connect(str(path))
                        return
                    except (QMPError, OSError) as exc:  # not accepting yet: try again
                        last = exc
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise QemuError(f"QEMU ({log.stem}): QMP socket {path} did not answer (last: "
                        f"{last!r}) within "
                        f"{QMP_READY_TIMEOUT_S:.0f} s: {_tail(log)}") from None


async def _exited(proc: asyncio.subprocess.Process) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.01):
            await proc.wait()
    return proc.returncode is not None


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            async with asyncio.timeout(QUIT_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _tail(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines()
                 if "exceeds the recommended cpus" not in ln]
    except OSError:
        return "(no output)"
    return " | ".join(lines[-3:]) or "(no output)"


def _stamp(event: Any) -> float:
    """An event's QMP timestamp, in seconds of the host's wall clock."""
    ts = event["timestamp"]
    return float(ts["seconds"] + ts["microseconds"] / 1e6)


async def migrate_qemu(qemu: str, vcpus: int, args: argparse.Namespace, sides: SideCpus,
                       tmp: Path) -> QemuMigration:
    """One QEMU migration of a guest with ``vcpus``, source to destination on this host."""
    src_qmp, dst_qmp, sock = tmp / "src.qmp", tmp / "dst.qmp", tmp / "migrate.sock"
    async with (
        qemu_process(qemu_command(qemu, vcpus, args, dst_qmp, incoming=True), dst_qmp,
                     sides.dest, tmp / "dst.log") as dst,
        qemu_process(qemu_command(qemu, vcpus, args, src_qmp, incoming=False), src_qmp,
                     sides.source, tmp / "src.log") as src,
    ):
        events = {"capabilities": [{"capability": "events", "state": True}]}
        await src.execute("migrate-set-capabilities", events)
        await dst.execute("migrate-set-capabilities", events)
        await src.execute("migrate-set-parameters", {"downtime-limit": DOWNTIME_LIMIT_MS})
        await dst.execute("migrate-incoming", {"uri": f"unix:{sock}"})
        await src.execute("cont")  # a running guest: the migration stops it (STOP)
        await asyncio.sleep(args.settle)  # let the firmware reach its idle loop
        stop, resume = await _switchover(src, dst, sock)
        info = await src.execute("query-migrate")
    return QemuMigration(downtime_ms=float(info.get("downtime", float("nan"))),
                         stop_to_resume_ms=(resume - stop) * 1e3,
                         total_ms=float(info.get("total-time", float("nan"))),
                         setup_ms=float(info.get("setup-time", float("nan"))),
                         ram_bytes=int(info.get("ram", {}).get("transferred", 0)))


async def _switchover(src: Any, dst: Any, sock: Path) -> tuple[float, float]:
    """Migrate; return the source's STOP and the destination's RESUME timestamps."""
    from qemu.qmp import EventListener

    on_src = EventListener(("STOP", "MIGRATION"))
    on_dst = EventListener(("RESUME",))
    stop: float | None = None
    with src.listen(on_src), dst.listen(on_dst):
        await src.execute("migrate", {"uri": f"unix:{sock}"})
        try:
            async with asyncio.timeout(MIGRATION_TIMEOUT_S):
                async for event in on_src:
                    if event["event"] == "STOP" and stop is None:
                        stop = _stamp(event)
                    # Only MIGRATION events carry data (STOP has none); a QMP Message's
                    # values are typed object.
                    data: Any = event["data"] if event["event"] == "MIGRATION" else {}
                    status = data.get("status")
                    if status in ("failed", "cancelled"):
                        info = await src.execute("query-migrate")
                        raise QemuError(f"QEMU migration {status}: "
                                        f"{info.get('error-desc', 'no error given')}")
                    if status == "completed":
                        break
                resume = _stamp(await on_dst.get())
        except TimeoutError:
            raise QemuError(f"QEMU migration did not complete and resume within "
                            f"{MIGRATION_TIMEOUT_S:.0f} s") from None
    if stop is None:
        raise QemuError("the source completed without a STOP event (was it running?)")
    return stop, resume


def migrate_devstate(vcpus: int, backend: str, workers: int, sides: SideCpus, *,
                     ram_mib: int | None = None) -> tuple[dict[str, Any], str | None]:
    """One devstate migration of the same vCPUs, no devices: the CSV fields, and what was
    wrong with the guest if anything. With ``ram_mib`` a live guest with that much RAM
    (its vCPUs executing the guest program until the stop, dirty rate 0: only its control
    pages written), its RAM precopied; without, bare vCPU state."""
    import time

    import uvloop
    from sweep import Point, pinned_params

    from devstate.config.params import Schedule
    from devstate.config.spec import parse_spec
    from devstate.migration.local import migrate_locally

    machine: dict[str, Any] = {"name": f"qemu-compare-{vcpus}", "seed": 7,
                               "vcpus": {"count": vcpus, "backend": backend}}
    if ram_mib is not None:
        machine["ram"] = {"size": f"{ram_mib}MiB", "dirty_rate": 0}
    spec = parse_spec(machine)
    source, dest = pinned_params(Point(vcpus, 0, workers, Schedule.CONCURRENT), sides)
    start = time.perf_counter()
    report = uvloop.run(migrate_locally(spec, source, dest_params=dest))
    wall_ms = (time.perf_counter() - start) * 1e3
    row: dict[str, Any] = {"devstate_downtime_ms": round(report.downtime_ms, 3),
                           "devstate_expected_ms": round(report.expected_ms, 3),
                           "devstate_verified": report.verified,
                           "devstate_live": spec.live,
                           "devstate_bytes": report.total_bytes}
    if not spec.live:
        return row, None
    guest = report.guest
    if guest is None:  # a live spec whose report has no guest block: say so, keep the row
        return row, "devstate: a live guest, but the report has no guest block"
    row |= {"devstate_guest_continued": guest.continued,
            "devstate_guest_vcpus_running": guest.vcpus_running,
            "devstate_wall_ms": round(wall_ms, 3)}
    ram = report.ram
    if ram is not None:
        row |= {"devstate_ram_rounds": ram.rounds,
                "devstate_ram_transferred_bytes": ram.transferred_bytes,
                "devstate_ram_stop_copy_bytes": ram.stop_copy_bytes,
                "devstate_ram_precopy_ms": round(ram.precopy_ms, 3),
                "devstate_total_ms": round(ram.precopy_ms + report.downtime_ms, 3)}
    if not guest.continued:
        return row, f"devstate: the guest did not continue: {guest.why}"
    # A live guest's RAM is precopied (concurrent schedule): no ram block means it was not.
    return row, None if ram is not None else "devstate: a live guest, but its RAM was " \
                                             "not precopied (the report has no ram block)"


def one_round(qemu: str, rnd: int, vcpus: int, args: argparse.Namespace,
              sides: SideCpus) -> dict[str, Any]:
    """QEMU then devstate for ``vcpus``; a failure of either is recorded in ``error``.

    A count beyond QEMU's ``-smp`` maximum runs devstate alone, with a ``note`` saying so.
    """
    from qemu.qmp import QMPError

    from devstate.errors import DevstateError

    row: dict[str, Any] = {"round": rnd, "vcpus": vcpus, "devstate_backend": args.backend,
                           "devstate_workers": args.workers, "note": "", "error": ""}
    errors = []
    if args.qemu_max is not None and vcpus > args.qemu_max:
        row["note"] = f"QEMU not run: its q35 allows at most {args.qemu_max} vCPUs"
    else:
        with tempfile.TemporaryDirectory(prefix="qemu-compare-") as tmp:
            try:
                result = asyncio.run(migrate_qemu(qemu, vcpus, args, sides, Path(tmp)))
                row.update({f"qemu_{k}": round(v, 3) if isinstance(v, float) else v
                            for k, v in asdict(result).items()})
            except (QemuError, QMPError, OSError) as exc:  # a failed row, not the run
                errors.append(f"qemu: {exc}")
    try:
        fields, problem = migrate_devstate(vcpus, args.backend, args.workers, sides,
                                           ram_mib=args.memory if args.live else None)
        row.update(fields)
        if problem:
            errors.append(problem)
    except (DevstateError, OSError, TimeoutError) as exc:
        errors.append(f"devstate: {exc}")
    row["error"] = "; ".join(errors)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Medians per vCPU count, side by side; for a live guest, in how many runs it
    continued."""
    live = any(r.get("devstate_live") is True for r in rows)
    lines = [f"{'vCPUs':>6} {'QEMU downtime':>14} {'QEMU stop->resume':>18} "
             f"{'devstate':>9} {'QEMU/devstate':>14} {'runs':>4}"
             + (f" {'guest continued':>15}" if live else "") + "  notes"]
    for vcpus in sorted({r["vcpus"] for r in rows}):
        mine = [r for r in rows if r["vcpus"] == vcpus]
        q_down = _median(mine, "qemu_downtime_ms")
        q_e2e = _median(mine, "qemu_stop_to_resume_ms")
        ours = _median(mine, "devstate_downtime_ms")
        ratio = f"{q_e2e / ours:.2f}x" if q_e2e and ours else "-"
        notes = "; ".join(sorted({r[k] for r in mine for k in ("note", "error") if r[k]}))
        continued = sum(r.get("devstate_guest_continued") is True for r in mine)
        lines.append(f"{vcpus:>6} {_ms(q_down):>14} {_ms(q_e2e):>18} {_ms(ours):>9} "
                     f"{ratio:>14} {len(mine):>4}"
                     + (f" {f'{continued}/{len(mine)}':>15}" if live else "") + f"  {notes}")
    if live:
        lines += ["", ram_table(rows)]
    return "\n".join(lines)


def ram_table(rows: list[dict[str, Any]]) -> str:
    """A live guest's RAM, medians per vCPU count: QEMU's total-time and RAM transferred
    beside devstate's precopy-to-resume and whole-call times, rounds and RAM sent in all
    and with the guest stopped (the module docstring says what each covers)."""
    lines = ["RAM (live, dirty rate 0):",
             f"{'vCPUs':>6} {'QEMU total':>11} {'QEMU RAM sent':>14} {'devstate total':>15} "
             f"{'devstate wall':>14} {'rounds':>6} {'devstate RAM sent':>18} "
             f"{'stop-copy':>10}"]
    for vcpus in sorted({r["vcpus"] for r in rows}):
        mine = [r for r in rows if r["vcpus"] == vcpus]
        rounds = _median(mine, "devstate_ram_rounds")
        lines.append(
            f"{vcpus:>6} {_ms(_median(mine, 'qemu_total_ms')):>11} "
            f"{_mib(_median(mine, 'qemu_ram_bytes')):>14} "
            f"{_ms(_median(mine, 'devstate_total_ms')):>15} "
            f"{_ms(_median(mine, 'devstate_wall_ms')):>14} "
            f"{'-' if rounds is None else f'{rounds:g}':>6} "
            f"{_mib(_median(mine, 'devstate_ram_transferred_bytes')):>18} "
            f"{_mib(_median(mine, 'devstate_ram_stop_copy_bytes')):>10}")
    return "\n".join(lines)


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.median(values) if values else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f} MiB"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vcpus", type=_positive, nargs="+", default=[64, 128, 256])
    p.add_argument("--rounds", type=_positive, default=3)
    p.add_argument("--memory", type=_positive, default=64,
                   help="guest RAM of QEMU (and of devstate's guest with --live), MiB")
    p.add_argument("--live", action="store_true",
                   help="devstate migrates a live guest with --memory of RAM at dirty rate "
                        "0 (its RAM precopied), not bare vCPUs")
    p.add_argument("--workers", type=_positive, default=None,
                   help="devstate workers per side (default: the CPUs of a side)")
    p.add_argument("--cpu", default=DEFAULT_CPU, help="QEMU's -cpu")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds the source guest runs before the migration starts")
    p.add_argument("--out", type=Path, default=Path("qemu-compare-out"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Compare; 0 also when QEMU or KVM is missing (said why), 1 if any run failed."""
    args = parse_args(argv)
    qemu = shutil.which(QEMU_BINARY)
    if qemu is None:
        print(INSTALL_HINT)
        return 0
    from devstate.cli import kvm_usable

    usable, why = kvm_usable()
    if not usable:
        print(f"KVM is not usable here ({why}): QEMU's accel=kvm cannot run, so there is "
              "nothing to compare with.")
        return 0
    args.backend = "kvm"
    sides = side_cpus()
    args.workers = args.workers or sides.per_side
    args.qemu_max = qemu_max_cpus(qemu)
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    info = {**host_info(), "qemu": qemu, "qemu_version": version[0] if version else None,
            "qemu_max_cpus": args.qemu_max, "qemu_memory_mib": args.memory,
            "qemu_cpu": args.cpu, "cpu_split": sides.note,
            "devstate_workers": args.workers, "devstate_live": args.live}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host.json").write_text(json.dumps(info, indent=2) + "\n")
    ours = (f"a live guest of {args.memory} MiB RAM at dirty rate 0 (RAM precopied while "
            f"it runs: the downtime carries only the last round)" if args.live
            else "kvm vCPUs, no RAM")
    print(f"{info['qemu_version']} (q35 max {args.qemu_max} vCPUs), guest RAM "
          f"{args.memory} MiB; devstate: {ours}, {args.workers} worker(s) per side\n"
          f"pinning: {sides.note}", flush=True)
    rows = run(qemu, args, sides)
    print(table(rows))
    print(f"wrote {args.out / 'qemu_compare.csv'} ({len(rows)} rows), {args.out / 'host.json'}")
    return 1 if any(r["error"] for r in rows) else 0


def run(qemu: str, args: argparse.Namespace, sides: SideCpus) -> list[dict[str, Any]]:
    """Every round of every vCPU count, interleaved; each row written as it finishes."""
    rows: list[dict[str, Any]] = []
    with (args.out / "qemu_compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        try:
            for rnd in range(1, args.rounds + 1):
                for vcpus in args.vcpus:
                    row = {c: "" for c in COLUMNS} | one_round(qemu, rnd, vcpus, args, sides)
                    writer.writerow(row)
                    f.flush()
                    rows.append(row)
                    print(f"round {rnd}: {vcpus} vCPUs: QEMU "
                          f"{_ms(_median([row], 'qemu_stop_to_resume_ms'))} stop->resume, "
                          f"devstate {_ms(_median([row], 'devstate_downtime_ms'))}"
                          + (f" (guest continued: {row['devstate_guest_continued']}; "
                             f"RAM: {row['devstate_ram_rounds'] or '-'} rounds, "
                             f"{_mib(_median([row], 'devstate_ram_stop_copy_bytes'))} "
                             f"stopped)" if args.live else "")
                          + "".join(f" ({row[k]})" for k in ("note", "error") if row[k]),
                          file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print(f"interrupted: {len(rows)} finished rows kept", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(main())
