"""Faults met by a migration driven over QMP: two ``devstate vm --qmp`` processes and the
``qemu.qmp`` client, with a source worker frozen (SIGSTOP) mid stop-and-copy.

Outcomes are asserted (statuses, errors, run states), never timings: the ceilings below
only bound the waiting, so that a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import EventListener, ExecuteError, QMPClient

from devstate.config.spec import parse_spec
from tests.test_qmp_migration import SLOW, _write_spec, client, vm_process

# A bound on waiting for the cancel to end (the pool kills an unacknowledging worker
# after 5 s), not a speed assertion.
CANCEL_CEILING_S = 30.0
ENDED = ("cancelled", "failed", "completed")


def _vm_pid(qmp: Path) -> int:
    """The ``devstate vm`` process (a child of this one) that serves ``qmp``."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if f"unix:{qmp}" in child.cmdline():
                return child.pid
    raise AssertionError(f"no devstate vm serves {qmp}")


def _workers(vm_pid: int) -> list[psutil.Process]:
    """The VM's pool workers: the children of its multiprocessing forkserver (the VM's
    child whose command line runs ``multiprocessing.forkserver``)."""
    for child in psutil.Process(vm_pid).children():
        with contextlib.suppress(psutil.Error):
            if any("forkserver" in part for part in child.cmdline()):
                workers = child.children()
                assert workers, "a forkserver without workers"
                return sorted(workers, key=lambda p: (p.create_time(), p.pid))
    raise AssertionError(f"devstate vm {vm_pid} has no forkserver")


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _statuses(listener: EventListener, until: tuple[str, ...],
                    within: float = CANCEL_CEILING_S) -> list[str]:
    seen: list[str] = []
    async with asyncio.timeout(within):
        while not seen or seen[-1] not in until:
            event = await listener.get()
            if event["event"] == "MIGRATION":
                seen.append(event["data"]["status"])
    return seen


async def _prepare(src: QMPClient, dst: QMPClient, uri: str) -> None:
    await dst.execute("migrate-incoming", {"uri": uri})
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}]})
    await src.execute("migrate-set-parameters", {"downtime-limit": 60_000})


async def _cancel_and_look(src: QMPClient, listener: EventListener, before: list[str]
                           ) -> dict[str, Any]:
    """``migrate_cancel``, then what the source says once the migration ended: statuses
    seen (``before`` first), events, query-migrate, query-status, and ``cont``'s refusal
    (absent if ``cont`` was accepted)."""
    await src.execute("migrate_cancel")
    after = await _statuses(listener, ENDED)
    result: dict[str, Any] = {"seen": before + after,
                              "events": [e["event"] for e in listener.history],
                              "info": await src.execute("query-migrate"),
                              "status": await src.execute("query-status")}
    try:  # the source must not resume: its devices are gone, or the destination may run
        await src.execute("cont")
    except ExecuteError as exc:
        result["cont"] = str(exc)
    return result


def test_migrate_cancel_ends_although_a_source_worker_is_frozen(run, tmp_path: Path) -> None:
    """A source worker SIGSTOPped once the source says ``device`` (stop-and-copy of a 2 s
    device), then ``migrate_cancel``: the migration leaves ``cancelling`` (the pool kills
    the worker that does not acknowledge), and query-migrate's error-desc says the worker
    was lost, so that its devices cannot run on either side."""
    spec_path = _write_spec(tmp_path, parse_spec(SLOW))
    incoming = tmp_path / "incoming.sock"

    async def scenario() -> dict[str, Any]:
        async with vm_process(spec_path, tmp_path / "src.qmp", exit_code=None) as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp", "--incoming", "defer",
                           exit_code=None) as dst_path:
            workers = _workers(_vm_pid(src_path))
            frozen = workers[0]
            try:
                async with client(src_path, "source") as src, client(dst_path, "dest") as dst:
                    await _prepare(src, dst, f"unix:{incoming}")
                    listener = EventListener(("MIGRATION", "STOP", "RESUME"))
                    with src.listen(listener):
                        await src.execute("migrate", {"uri": f"unix:{incoming}"})
                        before = await _statuses(listener, ("device", *ENDED), within=120)
                        frozen.suspend()  # SIGSTOP: neither answers nor dies
                        result = await _cancel_and_look(src, listener, before)
                    result.update(killed=_gone(frozen),
                                  others_alive=[not _gone(w) for w in workers[1:]])
                    await src.execute("quit")
                    with contextlib.suppress(Exception):
                        await dst.execute("quit")
            finally:
                with contextlib.suppress(psutil.Error):
                    frozen.resume()
                with contextlib.suppress(psutil.Error):
                    frozen.kill()
            return result

    out = run(scenario())
    seen, info = out["seen"], out["info"]
    assert "device" in seen and "cancelling" in seen, seen
    # Not stuck in cancelling; and not "cancelled", which would tell a controller the
    # source runs on: its lost devices are gone.
    assert seen[-1] == "failed", seen
    assert info["status"] == seen[-1], info
    error = info.get("error-desc", "")
    assert "worker 0 was lost while cancelling" in error, info
    assert "cannot run on either side" in error, info
    assert out["killed"], "the frozen worker was killed"
    assert all(out["others_alive"]), "only the frozen worker was killed"
    # Its devices died with it: the VM is not running anywhere, and no RESUME says so.
    assert not out["status"]["running"], out["status"]
    assert "RESUME" not in out["events"], out["events"]
    assert "cont" in out, "cont resumed a VM whose devices are gone"


def test_migrate_cancel_after_commit_does_not_say_cancelled(run, tmp_path: Path) -> None:
    """The destination's workers freeze at ``resume`` (after COMMIT: ``--fault
    resume:freeze-worker``), then the source gets ``migrate_cancel``: past COMMIT a
    cancel cancels nothing, so the migration ends ``failed`` (never ``cancelled``), the
    error says it failed after commit, and the source stays stopped and refuses ``cont``
    (the destination may be running the VM)."""
    spec_path = _write_spec(tmp_path, parse_spec(SLOW))
    incoming = tmp_path / "incoming.sock"

    async def scenario() -> dict[str, Any]:
        async with vm_process(spec_path, tmp_path / "src.qmp", exit_code=None) as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp", "--incoming", "defer",
                           "--fault", "resume:freeze-worker", exit_code=None) as dst_path:
            dst_vm = psutil.Process(_vm_pid(dst_path))
            dst_workers = _workers(dst_vm.pid)
            try:
                async with client(src_path, "source") as src, client(dst_path, "dest") as dst:
                    await _prepare(src, dst, f"unix:{incoming}")
                    listener = EventListener(("MIGRATION", "STOP", "RESUME"))
                    with src.listen(listener):
                        await src.execute("migrate", {"uri": f"unix:{incoming}"})
                        before = await _statuses(listener, ("device", *ENDED), within=120)
                        # A destination worker stopped itself at resume: COMMIT is behind.
                        async with asyncio.timeout(120):
                            while not any(w.status() == psutil.STATUS_STOPPED
                                          for w in dst_workers):
                                await asyncio.sleep(0.02)
                        result = await _cancel_and_look(src, listener, before)
                    await src.execute("quit")
            finally:
                for proc in (*dst_workers, dst_vm):
                    with contextlib.suppress(psutil.Error):
                        proc.kill()  # a stopped process dies too
            return result

    out = run(scenario())
    seen, info = out["seen"], out["info"]
    assert "device" in seen and "cancelling" in seen, seen  # the cancel came before the end
    assert seen[-1] == "failed" and "cancelled" not in seen, seen
    assert info["status"] == "failed", info
    error = info.get("error-desc", "")
    assert "failed after commit" in error, info
    assert "the destination may be running" in error, info
    assert not out["status"]["running"], out["status"]
    assert "RESUME" not in out["events"], out["events"]
    assert "two copies" in out.get("cont", ""), out
