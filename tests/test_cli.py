"""The devstate command as a user runs it: demo, migrate, errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def devstate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devstate", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow  # two migrations of the default machine: a live guest of 512 vCPUs
def test_demo_json_reports_both_modes_on_the_default_machine() -> None:
    from devstate.cli import kvm_usable

    usable, why = kvm_usable()
    done = devstate("demo", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for mode in ("sequential", "concurrent"):
        assert out[mode]["downtime_ms"] > 0
        devices = out[mode]["devices"]
        ram = [d for d in devices if d["id"].startswith("ram/")]
        assert len([d for d in devices if d["id"].startswith(("cpu/", "vfio/"))]) == 516
        assert all({"id", "bytes", "verified"} <= d.keys() and d["verified"] for d in devices)
        guest = out[mode]["guest"]
        if usable:  # the live guest: its RAM moved, and it went on running
            assert len(ram) == 8 and guest["continued"] and guest["vcpus_running"] == 512
            assert guest["ram_bytes"] == 256 << 20
        else:
            assert not ram and guest is None
    assert out["sequential"]["workers"] == 1
    assert out["speedup"] > 1.0
    assert out["vcpu_backend"] == ("kvm" if usable else "sim-vcpu")
    assert why in out["vcpu_backend_reason"]


@pytest.mark.slow  # two CLI migrations
def test_migrate_prints_a_table_or_json() -> None:
    spec = str(EXAMPLES / "one-nic-32mib.toml")
    table = devstate("migrate", "--spec", spec, "--sequential")
    assert table.returncode == 0, table.stderr
    assert "sequential: 1 worker(s)" in table.stdout and "vfio/nic0" in table.stdout
    assert "verified bit-exact" in table.stdout
    as_json = devstate("migrate", "--spec", spec, "--json", "--workers", "2")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["mode"] == "concurrent" and report["workers"] == 2
    assert [d["id"] for d in report["devices"]] == ["vfio/nic0"]
    assert report["devices"][0]["verified"] is True


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[devices]]\nname = "x"\nsize = 0\n')
    done = devstate("migrate", "--spec", str(bad))
    assert done.returncode == 1
    assert done.stderr.strip() == f"devstate: error: {bad}: devices[0].size: must be > 0"
    assert "Traceback" not in done.stderr
    usage = devstate("migrate", "--spec", str(bad), "--workers", "0")
    assert usage.returncode == 2 and "must be at least 1" in usage.stderr
    both = devstate("migrate", "--spec", str(bad), "--workers", "2", "--sequential")
    assert both.returncode == 2 and "cannot take --workers above 1" in both.stderr
    precopy = devstate("migrate", "--spec", str(bad), "--sequential", "--precopy")
    assert precopy.returncode == 2 and "cannot go together" in precopy.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.slow  # a 4 s migration, interrupted
def test_interrupt_mid_migration_stops_everything(tmp_path: Path, sig: signal.Signals) -> None:
    spec = tmp_path / "slow.toml"
    spec.write_text('[[devices]]\nname = "big"\nsize = "512MiB"\n'
                    'read_bandwidth = "128MiB/s"\n')  # ~4 s of saving: time to interrupt
    proc = subprocess.Popen([sys.executable, "-m", "devstate", "migrate", "--spec", str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_both_sides(proc.pid)
        family = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C, or a service manager's stop
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The shell's convention, 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM.
    assert proc.returncode == 128 + sig
    said = "interrupted" if sig == signal.SIGINT else "terminated"
    assert f"{said}; everything it started was stopped" in err
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, [p.cmdline() for p in alive]


def _wait_for_both_sides(pid: int, timeout_s: float = 60.0) -> None:
    """Until the destination's device model runs: the migration is set up on both sides."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(child.cmdline())
                if " vm " in cmd and any("vfio.model" in " ".join(c.cmdline())
                                         for c in child.children(recursive=True)):
                    return
        time.sleep(0.05)
    raise AssertionError("the migration never got under way")


@pytest.mark.slow  # a killed process tree
def test_a_killed_migration_leaves_nothing_running(tmp_path: Path) -> None:
    """SIGKILL of the source coordinator: its workers see their pipes close, the device
    models their owners die, and the destination its parent: everything ends by itself."""
    spec = tmp_path / "slow.toml"
    spec.write_text('[vcpus]\ncount = 8\n[[devices]]\nname = "big"\nsize = "512MiB"\n'
                    'read_bandwidth = "128MiB/s"\n')
    proc = subprocess.Popen([sys.executable, "-m", "devstate", "migrate", "--spec", str(spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    with _killed_at_exit(proc):
        _wait_for_both_sides(proc.pid)
        family = psutil.Process(proc.pid).children(recursive=True)
    _assert_all_end(family)
    pids = {proc.pid} | {p.pid for p in family}
    leftovers = [n for n in os.listdir("/dev/shm")
                 if n.startswith("devstate-") and int(n.split("-")[1]) in pids]
    assert not leftovers


@pytest.mark.slow  # a killed parent, a waiting destination
def test_a_one_shot_destination_ends_with_the_process_that_started_it(tmp_path: Path) -> None:
    spec = tmp_path / "m.toml"
    spec.write_text('[[devices]]\nname = "nic0"\nsize = "4MiB"\n')
    sock = tmp_path / "in.sock"
    # A parent that starts the destination, says its pid, then waits to be killed.
    launcher = ("import os, subprocess, sys, time\n"
                "p = subprocess.Popen([sys.executable, '-m', 'devstate', 'vm', '--spec', "
                f"{str(spec)!r}, '--incoming', 'unix:{sock}', '--once', '--parent', "
                "str(os.getpid())], stdout=subprocess.PIPE)\n"
                "print(p.pid, flush=True); p.stdout.readline(); print('ready', flush=True)\n"
                "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    with _killed_at_exit(parent):
        dest_pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "ready"  # listening, devices open
        dest = psutil.Process(dest_pid)
        family = [dest, *dest.children(recursive=True)]
    _assert_all_end(family)
    assert not sock.exists()  # it unwound: the listener removed its socket file
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"devstate-{dest_pid}-")]


@contextlib.contextmanager
def _killed_at_exit(proc: subprocess.Popen) -> Iterator[None]:
    """SIGKILL ``proc`` (and reap it) when the block ends, however it ends."""
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _assert_all_end(family: list[psutil.Process], timeout_s: float = 15.0) -> None:
    _, alive = psutil.wait_procs(family, timeout=timeout_s)
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop to an unprivileged user")
def test_demo_falls_back_to_sim_vcpu_where_dev_kvm_cannot_be_opened() -> None:
    """A real unopenable /dev/kvm: the demo's machine, chosen as user nobody (for whom the
    root-only device node answers EACCES), runs on sim-vcpu and says why."""
    if os.path.exists("/dev/kvm") and os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is open to every user here: nobody could use it too")
    # Everything the probe imports, lazily too, is loaded before the drop: the
    # interpreter's own files may be readable by root only.
    probe = ("import argparse, os\n"
             "from devstate import cli\n"
             "from devstate.devices.kvm import device\n"
             "cli.load_default_machine()\n"
             "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
             "spec, why = cli.demo_machine(argparse.Namespace(spec=None))\n"
             "print(spec.vcpus.backend, '|', why)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    backend, _, why = done.stdout.strip().partition(" | ")
    assert backend == "sim-vcpu"
    assert "/dev/kvm cannot be opened" in why


def test_vcpu_flags_reach_the_parameters_and_params_file_refuses_them(tmp_path: Path) -> None:
    from devstate.cli.parser import parse_args, vcpu_params
    from devstate.config.params import Readback

    args = parse_args(["migrate", "--spec", "x.toml", "--vcpu-threads", "3",
                       "--vcpu-readback", "before-commit", "--experimental-sharded-vms"])
    assert vcpu_params(args) == {"vcpu_threads": 3, "vcpu_readback": Readback.BEFORE_COMMIT,
                                 "sharded_vms": True}
    assert vcpu_params(parse_args(["migrate", "--spec", "x.toml"])) == {
        "vcpu_threads": None, "vcpu_readback": Readback.DIGEST, "sharded_vms": False}
    # A destination given every parameter as JSON takes no parameter flag beside it.
    done = devstate("vm", "--spec", "x.toml", "--incoming", f"unix:{tmp_path / 's'}",
                    "--params", str(tmp_path / "p.json"), "--vcpu-threads", "2",
                    "--vcpu-readback", "digest")
    assert done.returncode == 2
    assert "drop --vcpu-threads, --vcpu-readback" in done.stderr
    bad = devstate("migrate", "--spec", "x.toml", "--vcpu-threads", "0")
    assert bad.returncode == 2 and "--vcpu-threads" in bad.stderr
