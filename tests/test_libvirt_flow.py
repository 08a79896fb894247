"""libvirt's migration flow, replayed through ``qemu.qmp`` against two ``devstate vm --qmp``
processes: what libvirt sends a QEMU source and destination for a plain live migration
(src/qemu/qemu_migration.c, qemu_migration_params.c), and its roll back when the
destination fails after completion.

Outcomes are asserted (statuses, events, verification), never timings. The machine is the
default machine's shape made small (a live KVM guest with RAM, a precopied VFIO device):
libvirt's flow does not depend on the machine's size, and the default machine itself goes
through QMP in tests/test_qmp_migration.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from devstate.arena.slots import sweep_stale_segments
from devstate.cli import kvm_usable
from devstate.config.spec import parse_spec
from tests.test_qmp_migration import MIGRATION_TIMEOUT_S, _write_spec, client, vm_process

USABLE, WHY = kvm_usable()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"needs KVM: {WHY}")


async def _until(listener: EventListener, event: str, status: str | None = None
                 ) -> list[tuple[str, str]]:
    """Events until ``event`` (with that MIGRATION ``status``), as (event, status) pairs."""
    seen: list[tuple[str, str]] = []
    async with asyncio.timeout(MIGRATION_TIMEOUT_S):
        while True:
            got = await listener.get()
            seen.append((got["event"], got["data"].get("status", "")))
            if seen[-1] == (event, status or ""):
                return seen


async def _reset_capabilities(qmp: QMPClient) -> None:
    """libvirt's qemuMigrationParamsReset: every listed capability back to false."""
    listed = await qmp.execute("query-migrate-capabilities")
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": c["capability"], "state": False} for c in listed]})


async def _set_capabilities(qmp: QMPClient, *names: str) -> None:
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": name, "state": True} for name in names]})


def test_libvirt_migration_then_roll_back_after_a_destination_failure(
        run, tmp_path: Path) -> None:
    spec_path = _write_spec(tmp_path, parse_spec({
        "name": "libvirt-flow", "seed": 16, "vcpus": {"count": 32, "backend": "kvm"},
        "ram": {"size": "32MiB"},
        "devices": [{"name": "nic0", "size": "16MiB", "firmware_latency_ms": 50,
                     "precopy": True}]}))
    incoming = [tmp_path / "in1.sock", tmp_path / "in2.sock"]

    async def migration(src: QMPClient, dst: QMPClient, uri: str) -> dict[str, Any]:
        """One libvirt-driven migration, from capabilities to completion."""
        out: dict[str, Any] = {}
        saved = {"src": await src.execute("query-migrate-parameters"),
                 "dst": await dst.execute("query-migrate-parameters")}
        out["defaults"] = saved["src"]
        # libvirt writes the saved values back before applying its own (and after).
        await src.execute("migrate-set-parameters", saved["src"])
        await _reset_capabilities(src)
        await _reset_capabilities(dst)
        await _set_capabilities(src, "events", "pause-before-switchover")
        await _set_capabilities(dst, "events", "late-block-activate")
        await dst.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
        await src.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": "",
                                                     "downtime-limit": 1,  # below any estimate
                                                     "max-bandwidth": 9223372036853727232})
        dst_events = EventListener(("MIGRATION", "RESUME"))
        src_events = EventListener(("MIGRATION", "STOP", "RESUME"))
        with dst.listen(dst_events), src.listen(src_events):
            await dst.execute("migrate-incoming", {"uri": uri})
            out["dst_listening"] = await dst.execute("query-migrate")
            await src.execute("migrate", {"uri": uri})
            before = await _until(src_events, "MIGRATION", "active")
            info = await src.execute("query-migrate")
            while "expected-downtime" not in info:  # the first estimate is being made
                info = await src.execute("query-migrate")
            out["waiting"] = (info, await src.execute("query-status"))
            # virsh migrate-setmaxdowntime / migrate-setspeed while it runs (the precopy
            # of the guest's RAM moves at the latter, as QEMU's does)
            await src.execute("migrate-set-parameters", {"downtime-limit": 2_000_000})
            await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
            before += await _until(src_events, "MIGRATION", "pre-switchover")
            out["at_pre_switchover"] = await src.execute("query-status")
            await src.execute("migrate-continue", {"state": "pre-switchover"})
            src_seen = before + await _until(src_events, "MIGRATION", "completed")
            dst_seen = await _until(dst_events, "MIGRATION", "completed")
        out.update(src_seen=src_seen, dst_seen=dst_seen,
                   info=await src.execute("query-migrate"),
                   src_status=await src.execute("query-status"),
                   dst_status=await dst.execute("query-status"))
        # libvirt restores what it saved, on both sides.
        await src.execute("migrate-set-parameters", saved["src"])
        await dst.execute("migrate-set-parameters", saved["dst"])
        await _reset_capabilities(src)
        await _reset_capabilities(dst)
        out["restored"] = await src.execute("query-migrate-parameters")
        return out

    async def scenario() -> dict[str, Any]:
        result: dict[str, Any] = {}
        async with vm_process(spec_path, tmp_path / "src.qmp") as src_path, \
                client(src_path, "libvirt-src") as src:
            async with vm_process(spec_path, tmp_path / "dst.qmp", "--incoming", "defer") \
                    as dst_path, client(dst_path, "libvirt-dst") as dst:
                result["first"] = await migration(src, dst, f"unix:{incoming[0]}")
                # The destination runs the VM: no roll back.
                try:
                    await src.execute("cont")
                except ExecuteError as exc:
                    result["cont_while_dst_runs"] = str(exc)
                # Finish failed on the destination: libvirt ends its QEMU, then rolls back
                # the source with cont.
                shutdown = EventListener(("SHUTDOWN",))
                with dst.listen(shutdown):
                    await dst.execute("quit")
                    result["shutdown"] = (await shutdown.get())["data"]
            resumed = EventListener(("RESUME",))
            with src.listen(resumed):
                await src.execute("cont")
                await resumed.get()
            result["rolled_back"] = await src.execute("query-status")
            # The VM runs on the source again, and migrates again; this destination is
            # killed without a word after completion: the source must not resume.
            async with vm_process(spec_path, tmp_path / "dst2.qmp", "--incoming", "defer",
                                  exit_code=None) as dst_path, \
                    client(dst_path, "libvirt-dst2") as dst:
                result["second"] = await migration(src, dst, f"unix:{incoming[1]}")
                kill_vm(dst_path)
            try:
                await src.execute("cont")
            except ExecuteError as exc:
                result["cont_after_kill"] = str(exc)
            result["after_kill"] = await src.execute("query-status")
            await src.execute("quit")
        return result

    out = run(scenario())
    for key in ("first", "second"):
        flow = out[key]
        assert flow["defaults"]["downtime-limit"] == 300 or key == "second"
        listening = flow["dst_listening"]
        assert listening["status"] == "setup"
        assert listening["socket-address"] == [
            {"type": "unix", "path": str(incoming[0 if key == "first" else 1])}]
        waiting, running = flow["waiting"]
        assert waiting["status"] == "active" and waiting["expected-downtime"] > 1
        assert running["status"] == "running"
        assert flow["at_pre_switchover"]["status"] == "running"  # no STOP before the stop
        events = flow["src_seen"]
        statuses = [s for e, s in events if e == "MIGRATION"]
        assert statuses == ["setup", "active", "pre-switchover", "device", "completed"]
        assert events.index(("STOP", "")) == events.index(("MIGRATION", "device")) - 1
        assert [s for e, s in flow["dst_seen"] if e == "MIGRATION"] == [
            "setup", "active", "completed"]
        info = flow["info"]
        assert info["status"] == "completed" and info["devstate"]["verified"]
        assert flow["src_status"]["status"] == "postmigrate"
        assert flow["dst_status"]["status"] == "running"
        assert flow["restored"] == flow["defaults"]
    assert out["first"]["defaults"]["max-bandwidth"] == 128 << 20
    assert "runs on the destination" in out["cont_while_dst_runs"]
    assert out["shutdown"] == {"guest": False, "reason": "host-qmp-quit"}
    assert out["rolled_back"]["status"] == "running"
    assert "may be running" in out["cont_after_kill"]
    assert out["after_kill"]["status"] == "postmigrate"


def kill_vm(qmp_path: Path) -> None:
    """SIGKILL the VM serving ``qmp_path`` (the peer of a connection to it), and remove the
    arena its death left behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(qmp_path))
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _, _ = struct.unpack("3i", creds)
    os.kill(pid, signal.SIGKILL)
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    sweep_stale_segments()
