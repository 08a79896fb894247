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
async def vm_process(spec_path: Path, qmp: Path, *extra: str,
                     exit_code: int | None = 0) -> AsyncIterator[Path]:
    """A ``devstate vm --qmp`` process; yields its socket once it serves. It must end
    by itself with ``exit_code`` (None: the test kills it); it is killed (and the test
    fails) if it does not."""
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
            code = await proc.wait()
        assert exit_code is None or code == exit_code
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
    """The default live guest (512 running KVM vCPUs, 256 MiB, 4 vfio-sim devices) between
    two devstate VMs, driven over QMP:
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
    assert ours["verified"] and len(ours["devices"]) == 3 + 512 + 8 + 4 and ours["critical-path"]
    assert ours["guest"]["continued"] and ours["guest"]["vcpus_running"] == 512  # it ran on
    assert info["vfio"]["transferred"] >= sum(v.size for v in spec.vfio)  # + stream headers
    assert out["src"] == {"status": "postmigrate", "running": False, "singlestep": False}
    assert out["dst"]["status"] == "running" and out["dst"]["running"]
    assert out["dst_info"]["status"] == "completed"


SLOW: dict[str, Any] = {"seed": 9, "vcpus": {"count": 64},
                        "devices": [{"name": "slow", "size": "48MiB",
                                     "write_bandwidth": "24MiB/s"}]}


def test_migrate_cancel_mid_way_leaves_the_source_running(run, tmp_path: Path) -> None:
    """Cancelled during stop-and-copy (2 s of it): cancelling, then cancelled; the source
    runs again (RESUME), the destination discarded and exited 1 (exit-on-error, as QEMU)."""
    spec_path = _write_spec(tmp_path, parse_spec(SLOW))
    incoming = tmp_path / "incoming.sock"

    async def scenario() -> dict[str, Any]:
        async with vm_process(spec_path, tmp_path / "src.qmp") as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp",
                           "--incoming", f"unix:{incoming}", exit_code=1):
            async with client(src_path, "source") as src:
                await src.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]})
                await src.execute("migrate-set-parameters", {"downtime-limit": 60_000})
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
                await src.execute("migrate-set-parameters", {"downtime-limit": 60_000})
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
                                   {"capabilities": [{"capability": "x-nonsense",
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
    assert "not supported by devstate" in messages and "does not accept value" in messages
    assert "affinity, spread" in messages and "between 0 and" in messages
    assert "fixed at 2" in messages and "Invalid migration URI" in messages
    assert "--incoming defer" in messages
    assert out["errors"]['no-such-command{}'][0] == "CommandNotFound"
    assert out["params"] == {"downtime-limit": 450, "max-bandwidth": 64 << 20,
                             "multifd-channels": 2, "tls-creds": "", "tls-hostname": "",
                             "tls-authz": "", "x-routing": "spread", "x-overrun": "abort",
                             "x-peer-timeout": 0, "x-workers": 2}
    assert {"capability": "return-path", "state": True} in out["caps"]
    assert {"migrate", "migrate-incoming", "query-migrate", "migrate_cancel", "quit",
            "qmp_capabilities", "query-commands", "stop", "cont"} <= out["names"]
    assert out["empty"] == {}


# Every command of a devstate VM but the two that end a migration on purpose.
FUZZ_COMMANDS = ["query-status", "stop", "cont", "migrate", "migrate-incoming",
                 "query-migrate", "migrate-set-parameters", "query-migrate-parameters",
                 "migrate-set-capabilities", "query-migrate-capabilities",
                 "query-commands", "qmp_capabilities", "migrate-continue", "object-add",
                 "object-del", "query-version", "query-qmp-schema"]
FUZZ_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3), max_leaves=6)
FUZZ_ARGUMENTS = st.dictionaries(
    st.sampled_from(["uri", "downtime-limit", "max-bandwidth", "multifd-channels",
                     "x-routing", "x-overrun", "x-peer-timeout", "x-workers", "capabilities",
                     "exit-on-error",
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
        await src.execute("migrate-set-parameters", {"downtime-limit": 60_000})
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


SMALL: dict[str, Any] = {"seed": 3, "vcpus": {"count": 8},
                         "devices": [{"name": "nic", "size": "4MiB"}]}


def test_a_libvirt_probe_reads_qemu_9_1_defaults_and_its_capabilities_are_accepted(
        run, tmp_path: Path) -> None:
    """What libvirt reads and sets before a migration, on one VM: version and schema,
    QEMU's default parameters and capabilities, the capabilities of a plain live migration
    and their reset to false, the parameters' full ranges, and QEMU's refusals."""
    spec_path = _write_spec(tmp_path, parse_spec(SMALL))

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with vm_process(spec_path, tmp_path / "src.qmp") as path, \
                client(path, "libvirt") as qmp:
            out["greeting"] = qmp.greeting.QMP.version["qemu"]
            out["version"] = await qmp.execute("query-version")
            out["schema"] = await qmp.execute("query-qmp-schema")
            out["commands"] = {c["name"] for c in await qmp.execute("query-commands")}
            out["caps"] = await qmp.execute("query-migrate-capabilities")
            out["params"] = await qmp.execute("query-migrate-parameters")
            for caps in ([{"capability": "pause-before-switchover", "state": True}],
                         [{"capability": "late-block-activate", "state": True}],
                         [{"capability": c["capability"], "state": False}
                          for c in out["caps"]],
                         [{"capability": "xbzrle", "state": False}]):
                assert await qmp.execute("migrate-set-capabilities",
                                         {"capabilities": caps}) == {}
            out["caps_after"] = await qmp.execute("query-migrate-capabilities")
            await qmp.execute("migrate-set-parameters", {"max-bandwidth": -1})
            out["negative"] = (await qmp.execute("query-migrate-parameters"))["max-bandwidth"]
            await qmp.execute("migrate-set-parameters", out["params"])  # libvirt's restore
            out["restored"] = await qmp.execute("query-migrate-parameters")
            errors = []
            for command, args in (("migrate-set-parameters", {"max-bandwidth": 1 << 64}),
                                  ("migrate-set-parameters", {"tls-authz": "authz0"}),
                                  ("migrate-continue", {"state": "pre-switchover"}),
                                  ("object-add", {"qom-type": "memory-backend-ram",
                                                  "id": "m0"}),
                                  ("object-del", {"id": "nothing"}),
                                  ("migrate", {"uri": "unix:/nowhere", "blk": True})):
                with pytest.raises(ExecuteError) as info:
                    await qmp.execute(command, args)
                errors.append(str(info.value))
            # qemu.qmp enabled oob (the greeting offers it); no devstate command is OOB
            with pytest.raises(ExecuteError) as info:
                await qmp.execute_msg(qmp.make_execute_msg("query-status", oob=True))
            errors.append(str(info.value))
            await qmp.execute("quit")
        out["errors"] = errors
        return out

    out = run(scenario())
    assert out["greeting"] == {"major": 9, "minor": 1, "micro": 0}
    assert out["version"]["qemu"] == {"major": 9, "minor": 1, "micro": 0}
    schema = {info["name"]: info for info in out["schema"]}
    assert {n for n, i in schema.items() if i["meta-type"] == "command"} == out["commands"]
    assert {n for n, i in schema.items() if i["meta-type"] == "event"} == {
        "MIGRATION", "STOP", "RESUME", "SHUTDOWN"}
    for info in out["schema"]:
        for key in ("arg-type", "ret-type"):
            assert key not in info or info[key] in schema  # every type named is defined
    assert {c["capability"]: c["state"] for c in out["caps"]} == {
        "events": False, "multifd": False, "return-path": True, "dirty-bitmaps": False,
        "late-block-activate": False, "pause-before-switchover": False,
        "switchover-ack": False, "auto-converge": False}
    assert out["caps_after"] == out["caps"]  # after the reset; return-path stays on
    assert out["params"] == {"downtime-limit": 300, "max-bandwidth": 134217728,
                             "multifd-channels": 2, "tls-creds": "", "tls-hostname": "",
                             "tls-authz": "", "x-routing": "affinity", "x-overrun": "finish",
                             "x-peer-timeout": 0, "x-workers": 2}
    assert out["negative"] == (1 << 64) - 1  # QEMU stores a negative size modulo 2**64
    assert out["restored"] == out["params"]
    assert out["errors"] == [
        "Parameter 'max-bandwidth' expects a value between -9223372036854775808 and "
        "18446744073709551615",
        "Parameter 'tls-authz': devstate has no authz objects; authorise clients with "
        "tls-creds' verify-peer and the CA instead",
        "Migration not in expected state: none",
        "Parameter 'qom-type' does not accept value 'memory-backend-ram' (devstate has "
        "tls-creds-x509 only)",
        "object 'nothing' not found",
        "Parameter 'blk' is unexpected",
        "The command query-status does not support OOB"]


def test_cancel_while_waiting_for_the_limit_and_at_pre_switchover(run, tmp_path: Path
                                                                   ) -> None:
    """A limit below the estimate keeps the migration active, the VM running, until
    migrate_cancel; at pre-switchover a wrong migrate-continue is refused and migrate_cancel
    cancels cleanly: the source runs, never stopped, and the destination, told to discard,
    exits 1 (exit-on-error)."""
    spec_path = _write_spec(tmp_path, parse_spec(SMALL))
    uri = f"unix:{tmp_path / 'incoming.sock'}"

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with vm_process(spec_path, tmp_path / "src.qmp") as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp", "--incoming", "defer",
                           exit_code=1) as dst_path, \
                client(src_path, "source") as src, client(dst_path, "dest") as dst:
            for qmp in (src, dst):
                await qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]})
            await src.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "pause-before-switchover", "state": True}]})
            await src.execute("migrate-set-parameters", {"downtime-limit": 0})
            dst_events = EventListener(("MIGRATION",))
            src_events = EventListener(("MIGRATION", "STOP", "RESUME"))
            with src.listen(src_events), dst.listen(dst_events):
                await dst.execute("migrate-incoming", {"uri": uri})
                await src.execute("migrate", {"uri": uri})
                first = await _statuses(src_events, ("active",))
                info = await src.execute("query-migrate")
                while "expected-downtime" not in info:
                    info = await src.execute("query-migrate")
                out["waiting"] = (info["status"], await src.execute("query-status"))
                with pytest.raises(ExecuteError) as refused:
                    await src.execute("migrate-set-parameters", {"multifd-channels": 4})
                out["refused"] = str(refused.value)
                await src.execute("migrate_cancel")
                first += await _statuses(src_events, ("cancelled",))
                out["after_first"] = await src.execute("query-status")
                # The destination was never connected to: it still listens.
                await src.execute("migrate-set-parameters", {"downtime-limit": 60_000})
                await src.execute("migrate", {"uri": uri})
                second = await _statuses(src_events, ("pre-switchover",))
                with pytest.raises(ExecuteError) as wrong:
                    await src.execute("migrate-continue", {"state": "active"})
                out["wrong"] = str(wrong.value)
                await src.execute("migrate_cancel")
                second += await _statuses(src_events, ("cancelled",))
                dst_seen = await _statuses(dst_events, ("failed",))
            out.update(first=first, second=second, dst_seen=dst_seen,
                       status=await src.execute("query-status"),
                       events=[e["event"] for e in src_events.history])
            await src.execute("quit")
        return out

    out = run(scenario())
    assert out["waiting"][0] == "active" and out["waiting"][1]["status"] == "running"
    assert "cannot change while a migration is in progress" in out["refused"]
    assert out["first"] == ["setup", "active", "cancelling", "cancelled"]
    assert out["after_first"]["status"] == "running"
    assert out["second"] == ["setup", "active", "pre-switchover", "cancelling", "cancelled"]
    assert out["wrong"] == "Migration not in expected state: pre-switchover"
    assert out["dst_seen"] == ["setup", "active", "failed"]
    assert out["status"]["status"] == "running" and "STOP" not in out["events"]


def _tls_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """QEMU's tls-creds-x509 directories: the destination's (server) and the source's
    (client), one CA."""
    import trustme

    ca = trustme.CA()
    server, source = ca.issue_cert("localhost"), ca.issue_cert("devstate-source")
    dirs = tmp_path / "server", tmp_path / "client"
    for directory, leaf, name in ((dirs[0], server, "server"), (dirs[1], source, "client")):
        directory.mkdir()
        ca.cert_pem.write_to_path(str(directory / "ca-cert.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(directory / f"{name}-cert.pem"))
        leaf.private_key_pem.write_to_path(str(directory / f"{name}-key.pem"))
    return dirs


def test_tls_creds_objects_secure_the_migration(run, tmp_path: Path) -> None:
    """libvirt's TLS migration: object-add tls-creds-x509 on both sides (the destination
    verifying the source), tls-creds naming them, tls-hostname for the certificate."""
    spec_path = _write_spec(tmp_path, parse_spec(SMALL))
    server_dir, client_dir = _tls_dirs(tmp_path)
    uri = f"unix:{tmp_path / 'incoming.sock'}"

    async def scenario() -> dict[str, Any]:
        async with vm_process(spec_path, tmp_path / "src.qmp") as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp", "--incoming", "defer") as dst_path, \
                client(src_path, "source") as src, client(dst_path, "dest") as dst:
            await dst.execute("object-add", {"qom-type": "tls-creds-x509",
                                             "id": "objlibvirt_migrate_tls0",
                                             "dir": str(server_dir),
                                             "endpoint": "server", "verify-peer": True})
            await src.execute("object-add", {"qom-type": "tls-creds-x509",
                                             "id": "objlibvirt_migrate_tls0",
                                             "dir": str(client_dir),
                                             "endpoint": "client", "verify-peer": True})
            for qmp in (src, dst):
                await qmp.execute("migrate-set-parameters", {
                    "tls-creds": "objlibvirt_migrate_tls0", "tls-hostname": "localhost",
                    "downtime-limit": 60_000})
            refusals = []
            await src.execute("object-add", {"qom-type": "tls-creds-x509", "id": "srv",
                                             "dir": str(server_dir),
                                             "endpoint": "server"})
            for creds in ("srv", "missing"):
                await src.execute("migrate-set-parameters", {"tls-creds": creds})
                with pytest.raises(ExecuteError) as refused:
                    await src.execute("migrate", {"uri": uri})
                refusals.append(str(refused.value))
            await src.execute("migrate-set-parameters",
                              {"tls-creds": "objlibvirt_migrate_tls0"})
            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            async with asyncio.timeout(MIGRATION_TIMEOUT_S):
                while (info := await src.execute("query-migrate"))["status"] not in (
                        "completed", "failed", "cancelled"):
                    await asyncio.sleep(0.05)
            for qmp in (src, dst):
                await qmp.execute("migrate-set-parameters", {"tls-creds": ""})
                await qmp.execute("object-del", {"id": "objlibvirt_migrate_tls0"})
            await src.execute("quit")
            await dst.execute("quit")
        return {"info": info, "refusals": refusals}

    out = run(scenario())
    assert out["refusals"] == ["Expecting TLS credentials with a client endpoint",
                               "No TLS credentials with id 'missing'"]
    assert out["info"]["status"] == "completed", out["info"]
    assert out["info"]["devstate"]["verified"]


def test_migrate_incoming_on_an_address_in_use_says_so_once(run, tmp_path: Path) -> None:
    """The error names the address and the cause, once (it used to repeat "cannot listen
    on ..."), and the VM keeps waiting for an incoming migration it can listen for."""
    spec_path = _write_spec(tmp_path, parse_spec({"seed": 1, "vcpus": {"count": 4}}))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]

    async def scenario() -> tuple[str, str]:
        async with vm_process(spec_path, tmp_path / "dst.qmp", "--incoming", "defer") as path, \
                client(path, "probe") as qmp:
            with pytest.raises(ExecuteError) as refused:
                await qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
            status = (await qmp.execute("query-status"))["status"]
            await qmp.execute("quit")
            return str(refused.value), status

    with taken:
        error, status = run(scenario())
    assert error.count("cannot listen on") == 1 and f"127.0.0.1:{port}" in error, error
    assert status == "inmigrate"
