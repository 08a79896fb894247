"""A controller written for QEMU drives devstate: two ``devstate vm --qmp`` processes, and
nothing but the ``qemu.qmp`` client library talking to them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from qemu.qmp import EventListener, ExecuteError, QMPClient

from devstate.cli import load_default_machine
from devstate.config.spec import parse_spec

VM_START_TIMEOUT_S = 60.0
MIGRATION_TIMEOUT_S = 120.0


@contextlib.asynccontextmanager
async def vm_process(spec_path: Path, qmp: Path, *extra: str) -> AsyncIterator[Path]:
    """A ``devstate vm --qmp`` process; yields its socket once it serves. It must end
    by ``quit``; it is killed (and the test fails) if it does not."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devstate", "vm", "--spec", str(spec_path),
        "--qmp", f"unix:{qmp}", "--workers", "2", *extra,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(VM_START_TIMEOUT_S):
            line = (await proc.stdout.readline()).decode()
        assert line.strip() == f"qmp unix:{qmp}", line
        yield qmp
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def client(path: Path, name: str) -> AsyncIterator[QMPClient]:
    qmp = QMPClient(name)
    await qmp.connect(str(path))
    try:
        yield qmp
    finally:
        with contextlib.suppress(EOFError):  # after quit the VM hung up first
            await qmp.disconnect()


def _write_spec(tmp_path: Path, spec: Any) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    return path


async def _statuses(listener: EventListener, until: tuple[str, ...]) -> list[str]:
    seen: list[str] = []
    async with asyncio.timeout(MIGRATION_TIMEOUT_S):
        while not seen or seen[-1] not in until:
            event = await listener.get()
            if event["event"] == "MIGRATION":
                seen.append(event["data"]["status"])
    return seen


def test_a_qemu_controller_migrates_the_default_machine(run, tmp_path: Path) -> None:
    """512 vCPUs and 4 vfio-sim devices between two devstate VMs, driven over QMP:
    MIGRATION events to completed, downtime from query-migrate, the VMs' run states."""
    spec = load_default_machine()
    assert spec.vcpus.count == 512 and len(spec.vfio) == 4
    spec_path = _write_spec(tmp_path, spec)
    incoming = tmp_path / "incoming.sock"

    async def scenario() -> dict[str, Any]:
        async with vm_process(spec_path, tmp_path / "src.qmp") as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp", "--incoming", "defer") as dst_path:
            assert stat.S_IMODE(os.stat(src_path).st_mode) == 0o600
            async with client(src_path, "source") as src, client(dst_path, "dest") as dst:
                assert (await dst.execute("query-status"))["status"] == "inmigrate"
                await dst.execute("migrate-incoming", {"uri": f"unix:{incoming}"})
                await src.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]})
                await src.execute("migrate-set-parameters", {"downtime-limit": 2000,
                                                             "multifd-channels": 2})
                listener = EventListener(("MIGRATION", "STOP"))
                with src.listen(listener):
                    await src.execute("migrate", {"uri": f"unix:{incoming}"})
                    seen = await _statuses(listener, ("completed", "failed"))
                info = await src.execute("query-migrate")
                result = {"seen": seen, "info": info,
                          "src": await src.execute("query-status"),
                          "dst": await dst.execute("query-status"),
                          "dst_info": await dst.execute("query-migrate"),
                          "stop_seen": [e["event"] for e in listener.history]}
                await src.execute("quit")
                await dst.execute("quit")
            return result

    out = run(scenario())
    assert out["seen"][0] == "setup" and out["seen"][-1] == "completed", out["seen"]
    assert "device" in out["seen"] and "STOP" in out["stop_seen"]
    info = out["info"]
    assert info["status"] == "completed" and 0 < info["downtime"] < info["total-time"]
    assert info["setup-time"] >= 0 and "expected-downtime" not in info
    ours = info["devstate"]
    assert ours["verified"] and len(ours["devices"]) == 512 + 4 and ours["critical-path"]
    assert info["vfio"]["transferred"] >= sum(v.size for v in spec.vfio)  # + stream headers
    assert out["src"] == {"status": "postmigrate", "running": False, "singlestep": False}
    assert out["dst"]["status"] == "running" and out["dst"]["running"]
    assert out["dst_info"]["status"] == "completed"


SLOW: dict[str, Any] = {"seed": 9, "vcpus": {"count": 64},
                        "devices": [{"name": "slow", "size": "48MiB",
                                     "write_bandwidth": "24MiB/s"}]}


def test_migrate_cancel_mid_way_leaves_the_source_running(run, tmp_path: Path) -> None:
    """Cancelled during stop-and-copy (2 s of it): cancelling, then cancelled; the source
    runs again (RESUME), the destination discarded and exited (exit-on-error)."""
    spec_path = _write_spec(tmp_path, parse_spec(SLOW))
    incoming = tmp_path / "incoming.sock"

    async def scenario() -> dict[str, Any]:
        async with vm_process(spec_path, tmp_path / "src.qmp") as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp",
                           "--incoming", f"unix:{incoming}"):
            async with client(src_path, "source") as src:
                await src.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]})
                listener = EventListener(("MIGRATION", "STOP", "RESUME"))
                with src.listen(listener):
                    await src.execute("migrate", {"uri": f"unix:{incoming}"})
                    before = await _statuses(listener, ("device",))
                    await asyncio.sleep(0.3)  # bytes are moving
                    await src.execute("migrate_cancel")
                    after = await _statuses(listener, ("cancelled", "completed", "failed"))
                events = [e["event"] for e in listener.history]
                result = {"seen": before + after, "events": events,
                          "status": await src.execute("query-status"),
                          "info": await src.execute("query-migrate")}
                await src.execute("quit")
            return result

    out = run(scenario())
    assert out["seen"][-2:] == ["cancelling", "cancelled"], out["seen"]
    assert out["status"]["status"] == "running" and out["status"]["running"]
    assert out["events"].index("STOP") < out["events"].index("RESUME")
    assert out["info"]["status"] == "cancelled" and "downtime" not in out["info"]


@pytest.mark.slow  # a multi-second migration
def test_a_client_that_leaves_mid_migration_does_not_disturb_it(run, tmp_path: Path) -> None:
    spec_path = _write_spec(tmp_path, parse_spec(
        {"seed": 4, "vcpus": {"count": 32},
         "devices": [{"name": "nic", "size": "24MiB", "write_bandwidth": "48MiB/s"}]}))
    incoming = tmp_path / "incoming.sock"

    async def scenario() -> dict[str, Any]:
        async with vm_process(spec_path, tmp_path / "src.qmp") as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp",
                           "--incoming", f"unix:{incoming}") as dst_path:
            async with client(src_path, "leaving") as src:
                await src.execute("migrate", {"uri": f"unix:{incoming}"})
            expected = set()
            async with client(src_path, "returning") as src:
                async with asyncio.timeout(MIGRATION_TIMEOUT_S):
                    while (info := await src.execute("query-migrate"))["status"] not in (
                            "completed", "failed", "cancelled"):
                        if "expected-downtime" in info:
                            expected.add(info["expected-downtime"])
                        await asyncio.sleep(0.05)
                await src.execute("quit")
            async with client(dst_path, "dest") as dst:
                await dst.execute("quit")
            return info, expected

    info, expected = run(scenario())
    assert info["status"] == "completed" and info["devstate"]["verified"]
    assert expected and info["devstate"]["critical-path"]  # shown while it ran


def test_commands_refuse_what_does_not_apply_and_the_server_keeps_serving(
        run, tmp_path: Path) -> None:
    spec_path = _write_spec(tmp_path, parse_spec({"seed": 1, "vcpus": {"count": 4}}))

    async def scenario() -> dict[str, Any]:
        async with vm_process(spec_path, tmp_path / "src.qmp") as path, \
                client(path, "probe") as qmp:
            states = [(await qmp.execute("query-status"))["status"]]
            for command in ("stop", "stop", "cont", "cont"):  # each twice: no error
                await qmp.execute(command)
                states.append((await qmp.execute("query-status"))["status"])
            errors = {}
            for command, args in (("migrate-set-capabilities",
                                   {"capabilities": [{"capability": "postcopy-ram",
                                                      "state": True}]}),
                                  ("migrate-set-capabilities",
                                   {"capabilities": [{"capability": "return-path",
                                                      "state": False}]}),
                                  ("migrate-set-parameters", {"x-routing": "sideways"}),
                                  ("migrate-set-parameters", {"downtime-limit": -1}),
                                  ("migrate-set-parameters", {"x-workers": 7}),
                                  ("migrate", {"uri": "carrier-pigeon:home"}),
                                  ("migrate-incoming", {"uri": "unix:/nonexistent"}),
                                  ("no-such-command", {})):
                with pytest.raises(ExecuteError) as info:
                    await qmp.execute(command, args)
                errors[command + json.dumps(args)] = (info.value.error_class, str(info.value))
            await qmp.execute("migrate-set-parameters", {"downtime-limit": 450,
                                                         "max-bandwidth": 64 << 20,
                                                         "x-routing": "spread",
                                                         "x-overrun": "abort"})
            params = await qmp.execute("query-migrate-parameters")
            caps = await qmp.execute("query-migrate-capabilities")
            names = {c["name"] for c in await qmp.execute("query-commands")}
            empty = await qmp.execute("query-migrate")
            await qmp.execute("migrate_cancel")  # nothing to cancel: fine, like QEMU
            await qmp.execute("quit")
            return {"errors": errors, "params": params, "caps": caps, "names": names,
                    "empty": empty, "states": states}

    out = run(scenario())
    assert out["states"] == ["running", "paused", "paused", "running", "running"]
    messages = " | ".join(desc for _, desc in out["errors"].values())
    assert "not supported by devstate" in messages and "two-phase commit" in messages
    assert "affinity, spread" in messages and "between 0 and" in messages
    assert "fixed at 2" in messages and "Invalid migration URI" in messages
    assert "--incoming defer" in messages
    assert out["errors"]['no-such-command{}'][0] == "CommandNotFound"
    assert out["params"] == {"downtime-limit": 450, "max-bandwidth": 64 << 20,
                             "multifd-channels": 2, "x-routing": "spread",
                             "x-overrun": "abort", "x-workers": 2}
    assert {"capability": "return-path", "state": True} in out["caps"]
    assert {"migrate", "migrate-incoming", "query-migrate", "migrate_cancel", "quit",
            "qmp_capabilities", "query-commands", "stop", "cont"} <= out["names"]
    assert out["empty"] == {}


# Every command of a devstate VM but the two that end a migration on purpose.
FUZZ_COMMANDS = ["query-status", "stop", "cont", "migrate", "migrate-incoming",
                 "query-migrate", "migrate-set-parameters", "query-migrate-parameters",
                 "migrate-set-capabilities", "query-migrate-capabilities",
                 "query-commands", "qmp_capabilities"]
FUZZ_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3), max_leaves=6)
FUZZ_ARGUMENTS = st.dictionaries(
    st.sampled_from(["uri", "downtime-limit", "max-bandwidth", "multifd-channels",
                     "x-routing", "x-overrun", "x-workers", "capabilities", "exit-on-error",
                     "detach"]) | st.text(max_size=4), FUZZ_VALUES, max_size=3)
FUZZ_INPUT = (st.binary(max_size=200)
              | st.fixed_dictionaries({"execute": st.sampled_from(FUZZ_COMMANDS)
                                       | st.text(max_size=6)},
                                      optional={"arguments": FUZZ_ARGUMENTS | FUZZ_VALUES,
                                                "id": FUZZ_VALUES})
              .map(lambda request: json.dumps(request).encode()))
# Long on firmware, light on bytes: the migration stays in flight while the fuzzer runs.
FIRMWARE: dict[str, Any] = {"seed": 6, "vcpus": {"count": 32},
                            "devices": [{"name": "fw", "size": "4MiB",
                                         "firmware_latency_ms": 8_000}]}


def _poke(path: Path, data: bytes, negotiate: bool) -> None:
    """One fuzz input on a fresh connection: greeting, maybe negotiation, the input, and
    whatever comes back within a moment."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(path))
        assert sock.recv(65536).startswith(b'{"QMP"')
        if negotiate:
            sock.sendall(b'{"execute": "qmp_capabilities"}')
            assert b'"return"' in sock.recv(65536)
        sock.sendall(data)
        sock.settimeout(0.02)
        with contextlib.suppress(TimeoutError):
            sock.recv(65536)


@pytest.mark.slow  # 120 fuzzed inputs during an 8 s migration
def test_fuzzing_qmp_disturbs_neither_the_server_nor_a_migration_in_flight(
        run, tmp_path: Path) -> None:
    """Hypothesis feeds both VMs' QMP sockets bytes and requests (any command but quit and
    migrate_cancel, with arguments of any shape) during a migration: the migration
    completes, verified, and both servers still answer."""
    spec_path = _write_spec(tmp_path, parse_spec(FIRMWARE))
    incoming = tmp_path / "incoming.sock"

    async def start(src: QMPClient) -> None:
        await src.execute("migrate", {"uri": f"unix:{incoming}"})
        async with asyncio.timeout(MIGRATION_TIMEOUT_S):
            while (await src.execute("query-migrate"))["status"] != "device":
                await asyncio.sleep(0.02)

    async def scenario() -> tuple[dict[str, Any], str]:
        async with vm_process(spec_path, tmp_path / "src.qmp") as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp",
                           "--incoming", f"unix:{incoming}") as dst_path:
            async with client(src_path, "source") as src:
                await start(src)

                @hyp_settings(max_examples=120, deadline=None, database=None)
                @given(data=FUZZ_INPUT, negotiate=st.booleans(), to_source=st.booleans())
                def fuzz(data: bytes, negotiate: bool, to_source: bool) -> None:
                    _poke(src_path if to_source else dst_path, data, negotiate)

                # The fuzzer's sockets block: run it beside this loop, not on it.
                await asyncio.get_running_loop().run_in_executor(None, fuzz)
                during = (await src.execute("query-migrate"))["status"]
                async with asyncio.timeout(MIGRATION_TIMEOUT_S):
                    while (info := await src.execute("query-migrate"))["status"] not in (
                            "completed", "failed", "cancelled"):
                        await asyncio.sleep(0.1)
                await src.execute("quit")
            async with client(dst_path, "dest") as dst:
                assert (await dst.execute("query-status"))["status"] == "running"
                await dst.execute("quit")
            return info, during

    info, during = run(scenario())
    assert during == "device"  # the fuzzing happened while the migration was in flight
    assert info["status"] == "completed" and info["devstate"]["verified"], info


def test_vm_needs_incoming_or_qmp(tmp_path: Path) -> None:
    import subprocess

    spec_path = _write_spec(tmp_path, parse_spec({"seed": 1, "vcpus": {"count": 1}}))
    for extra in ([], ["--incoming", "defer"], ["--qmp", "tcp:localhost:4444"]):
        done = subprocess.run([sys.executable, "-m", "devstate", "vm", "--spec",
                               str(spec_path), *extra], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and ("--incoming URI" in done.stderr
                                         or "--qmp takes unix:PATH" in done.stderr)
