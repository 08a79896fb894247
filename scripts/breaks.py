#!/usr/bin/env python3
"""Deliberate breaks: does a test notice when a rule of the migration is broken?

Each break is a small textual patch to devstate's source (the rule it breaks, the exact
text it replaces) and the tests that should notice it. The script copies the working tree
(tracked and untracked files, and the built KVM extension) to a temporary directory, then
for each break: patches the copy, runs the break's tests there (``PYTHONPATH`` points
every process they start, workers and device models included, at the copy), records
whether at least one failed, and restores the file. The tree you work in is never
touched. It prints a markdown table (the one in docs/reliability.md).

A patch whose text is no longer in the source is reported as ``stale``, not as caught:
the table must be kept in step with the code it breaks (tests/test_breaks.py checks that
every patch still applies).

Usage::

    python scripts/breaks.py            # every break, a few minutes on 2 cores
    python scripts/breaks.py -k debugregs -k spread   # the breaks whose name has these
    python scripts/breaks.py --list     # names and rules only
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A break's tests run once; a hang counts as caught only if a test says so, never here.
TEST_TIMEOUT_S = 300


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` (which must occur exactly once) by ``new`` in ``path``."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Break:
    """One rule broken by ``patches``, and the pytest arguments of the tests that should
    notice (files, ``-k`` selections)."""

    name: str
    rule: str
    patches: tuple[Patch, ...]
    tests: tuple[str, ...]


BREAKS = (
    Break("verified-ignores-digests",
          "`verified` no longer requires the digest comparison to match",
          (Patch("devstate/migration/source.py",
                 "else bool(ours) and ours.get(r.id) == after.get(r.id))",
                 "else bool(ours))"),),
          ("tests/test_kvm_migration.py", "-k", "not_verified")),
    Break("end-digest-unchecked", "the END-of-device digest check removed",
          (Patch("devstate/worker/incoming.py",
                 "        if end.digest != self.digest.digest():\n"
                 "            raise IntegrityError(\"end.digest\", f\"{self.device.id}: state "
                 "digest mismatch\")\n", ""),),
          ("tests/test_migration.py", "-k", "end_digest")),
    Break("debugregs-skipped", "put skips KVM_SET_DEBUGREGS on both sides (native and ctypes)",
          (Patch("devstate/devices/kvm/engine.py",
                 "for section in (layout.resolve(s) for s in RESTORE_ORDER):",
                 "for section in (layout.resolve(s) for s in RESTORE_ORDER\n"
                 "                    if s is not Section.DEBUGREGS):"),
           Patch("devstate/devices/kvm/vcpu.py",
                 "        for section in self._restore:\n",
                 "        for section in (s for s in self._restore if s is not "
                 "Section.DEBUGREGS):\n")),
          ("tests/test_kvm_engine.py", "tests/test_kvm_vcpu.py", "-k",
           "order or round_trip or debugregs")),
    Break("firmware-out-of-load-path",
          "vfio firmware step (RESUMING -> STOP) left to the resume, after COMMIT",
          (Patch("devstate/worker/load.py", "            await device.load_end()\n", ""),),
          ("tests/test_migration.py", "-k", "firmware_step")),
    Break("spread-in-affinity-order", "spread routing sends a stream's chunks on its home "
                                      "channel",
          (Patch("devstate/worker/save.py",
                 "channel = self._routes.channel(self.worker, seq)",
                 "channel = self._routes.home(self.worker)"),),
          ("tests/test_routing.py", "-k", "own_channel")),
    Break("checksum-unverified", "packet checksums not verified on receipt",
          (Patch("devstate/worker/load.py",
                 "                wire.verify_payload(buf[start:start + HDR], header, payload)\n",
                 ""),
           Patch("devstate/worker/load.py",
                 "            wire.verify_payload(header_bytes, header, payload)\n", "")),
          ("tests/test_fault_matrix.py", "-k", "send-corrupt")),
    Break("record-accepted-twice", "a second RECORD of a device is put again",
          (Patch("devstate/worker/load.py",
                 "        if state.ended:\n            raise ProtocolError(\"packet.seq\", "
                 "f\"{state.device.id}: packet after its end\")\n", ""),),
          ("tests/test_load_segmentation.py", "-k", "twice")),
    Break("fin-count-unchecked", "a channel's FIN packet count not checked",
          (Patch("devstate/worker/load.py", "    if fin.seq != received:",
                 "    if False:"),),
          ("tests/test_load_segmentation.py", "-k", "fin")),
    Break("load-order-ignored", "load order (`after`, VM state before vCPUs) ignored: "
                                "streams complete and records put without waiting",
          (Patch("devstate/worker/load.py",
                 "            await self._order.wait(state.device.spec.index)", ""),
           Patch("devstate/worker/load.py", "            if not self._order.ready(index):",
                 "            if False:")),
          ("tests/test_deadline.py", "-k", "complete_their_loads")),
    Break("commit-before-loaded", "the source sends COMMIT once its save is done, without "
                                  "waiting for LOADED",
          (Patch("devstate/migration/source.py",
                 "await self.deadline.within_limit(self._alongside_peer(saving, loading), "
                 "t0, made)",
                 "await self.deadline.within_limit(saving, t0, made)"),),
          ("tests/test_migration.py", "-k", "four_streams")),
    Break("resume-before-commit", "the destination resumes its devices before COMMIT",
          (Patch("devstate/migration/destination.py",
                 "                    await commit.await_commit(main, loaded, bound)\n",
                 "                    await self.pool.call_all({w: m.Resume() for w in "
                 "range(self.plan.workers)})\n"
                 "                    await commit.await_commit(main, loaded, bound)\n"),),
          ("tests/test_fault_matrix.py", "-k", "dest-resume")),
    Break("vcpus-off-the-vm-owner", "owner rule: vCPUs dealt to every worker, each making "
                                    "a VM of its own, instead of the VM owner's one VM",
          (Patch("devstate/planning/plan.py",
                 "return (Backend.KVM_VM,) if sharded_vms else (Backend.KVM_VM, Backend.KVM)",
                 "return (Backend.KVM_VM,)"),),
          ("tests/test_kvm_migration.py", "-k", "vm_level_state or worker_0s_vcpus")),
    Break("guest-left-stopped", "a live guest's vCPUs are not resumed (a failed or "
                                "cancelled migration, or the destination after COMMIT)",
          (Patch("devstate/worker/loop.py",
                 "        return self._host.resume_guest() or (time.monotonic_ns() if "
                 "self._devices else 0)",
                 "        return time.monotonic_ns()"),),
          ("tests/test_live_guest.py", "-k", "failed or cancelled")),
    Break("guest-failures-ignored", "the continuity check ignores the failure codes the "
                                    "guest writes",
          (Patch("devstate/devices/kvm/guest_view.py",
                 "problems = [failure.describe() for failure in after.failures()]",
                 "problems = []"),),
          ("tests/test_live_guest.py", "-k", "register_changed")),
    Break("dirty-last-round-lost", "the guest's writes after precopy's last round are not "
                                   "synced at the stop",
          (Patch("devstate/devices/host.py",
                 "        if self._dirty is not None and self._dirty.on:\n"
                 "            self._dirty.sync()",
                 "        if False:\n            pass"),),
          ("tests/test_live_ram.py", "-k", "after_the_last")),
    Break("dirty-log-overwritten", "a dirty-log sync overwrites the pages no range took yet "
                                   "instead of adding to them",
          (Patch("devstate/devices/kvm/dirty.py",
                 "self._ram.dirty[first:first + words.size] |= words",
                 "self._ram.dirty[first:first + words.size] = words"),),
          ("tests/test_live_ram.py", "-k", "every_round or after_the_last")),
    Break("records-misaligned", "a RECORDS packet's records are read one stride off: each "
                                "device is put the next one's record",
          (Patch("devstate/protocol/wire.py",
                 "    return [(index, payload[table + i * stride:table + i * stride + length])",
                 "    return [(index, payload[table + (i + 1) % count * stride:"
                 "table + (i + 1) % count * stride + length])"),),
          ("tests/test_load_segmentation.py", "-k", "every_segmentation")),
    Break("downtime-to-resumed-seen", "a machine without a live guest says nothing of when "
                                      "its destination resumed: its downtime runs on to "
                                      "RESUMED's arrival, one hop later",
          (Patch("devstate/worker/loop.py",
                 "        return self._host.resume_guest() or (time.monotonic_ns() if "
                 "self._devices else 0)",
                 "        return self._host.resume_guest()"),),
          ("tests/test_migration.py", "-k", "four_streams")),
    Break("resume-stamped-by-every-worker", "a worker that holds no part of the VM answers "
                                            "its Resume with a time, which can end the "
                                            "downtime after the VM's own resume",
          (Patch("devstate/worker/loop.py",
                 "(time.monotonic_ns() if self._devices else 0)",
                 "time.monotonic_ns()"),),
          ("tests/test_pool.py", "-k", "resume_answers")),
    Break("continuity-one-look", "a live guest is judged at one look: a vCPU not moved yet "
                                 "is taken for one that stopped",
          (Patch("devstate/migration/guest.py",
                 "            if seen.final or trouble is not None or time.monotonic() >= "
                 "give_up:",
                 "            if True:"),),
          ("tests/test_guest_program.py", "-k", "slow_to_move")),
    Break("beat-after-answer", "a side's heartbeat waits a beat after its workers' "
                               "answers: late answers within the bound end the migration",
          (Patch("devstate/migration/liveness.py",
                 "await asyncio.gather(asyncio.sleep(self._bound.beat_s), self._alive())",
                 "await asyncio.sleep(self._bound.beat_s)\n"
                 "                await self._alive()"),),
          ("tests/test_liveness.py", "-k", "late_worker")),
    Break("runnable-not-counted", "a worker that is silent but runnable (starved by a busy "
                                  "guest, not frozen) stops its side's heartbeats",
          (Patch("devstate/worker/pool.py",
                 'return state == b"R"',
                 "return False"),),
          ("tests/test_liveness.py", "-k", "silent_worker")),
)


def copy_tree(into: Path) -> None:
    """Copy the working tree as it is (tracked and untracked, not ignored files) and the
    built extension (ignored, but the native KVM engine needs it) into ``into``."""
    listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    for built in (REPO / "devstate/devices/kvm").glob("_steps*.so"):
        shutil.copy2(built, into / "devstate/devices/kvm" / built.name)


def stale(tree: Path, brk: Break) -> list[str]:
    """The patches of ``brk`` whose text is not exactly once in ``tree``'s source."""
    return [f"{p.path}: {p.old.strip()[:60]!r} found {n} times"
            for p in brk.patches
            if (n := (tree / p.path).read_text().count(p.old)) != 1]


def run_break(tree: Path, brk: Break) -> tuple[str, str]:
    """Apply ``brk`` to ``tree``, run its tests, restore; (verdict, the tests' last line)."""
    problems = stale(tree, brk)
    if problems:
        return "stale", "; ".join(problems)
    originals = {p.path: (tree / p.path).read_text() for p in brk.patches}
    try:
        for patch in brk.patches:
            path = tree / patch.path
            path.write_text(path.read_text().replace(patch.old, patch.new))
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                               "no:cacheprovider", *brk.tests], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    finally:
        for name, text in originals.items():
            (tree / name).write_text(text)
    lines = done.stdout.strip().splitlines()
    last = lines[-1] if lines else done.stderr.strip()[-200:]
    if done.returncode == 1:
        return "caught", last
    if done.returncode == 0:
        return "survived", last
    return f"error (pytest exit {done.returncode})", last  # no test ran, or it crashed


def table(rows: Sequence[tuple[Break, str, str, float]]) -> str:
    """The results as a markdown table."""
    out = ["| break | rule broken | tests run | verdict | pytest says |",
           "| --- | --- | --- | --- | --- |"]
    for brk, verdict, last, seconds in rows:
        tests = " ".join(brk.tests).replace("|", "\\|")
        out.append(f"| `{brk.name}` | {brk.rule} | `{tests}` | **{verdict}** | "
                   f"{last.strip('= ')} ({seconds:.0f} s) |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected breaks and print the table; exit 1 if any survived or is stale."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], metavar="WORD",
                        help="only the breaks whose name contains WORD (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    args = parser.parse_args(argv)
    chosen = [b for b in BREAKS if not args.k or any(w in b.name for w in args.k)]
    if args.list:
        for brk in chosen:
            print(f"{brk.name}: {brk.rule}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="devstate-breaks-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for brk in chosen:
            start = time.monotonic()
            verdict, last = run_break(tree, brk)
            rows.append((brk, verdict, last, time.monotonic() - start))
            print(f"{brk.name}: {verdict}", file=sys.stderr, flush=True)
    print(table(rows))
    return 0 if all(verdict == "caught" for _, verdict, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
