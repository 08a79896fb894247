"""The command line as someone used to virsh and qemu tries it (issue 16): version, usage,
exit statuses, signals, JSON on failure, addresses, sockets in use, pictures, the learned
cost model. Every test runs ``devstate`` as a process, as a person or a script would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from devstate.cli.exits import Exit, status_of
from tests.test_cli import EXAMPLES, devstate
from tests.test_timeline import report

ONE_NIC = str(EXAMPLES / "one-nic-32mib.toml")


def test_version_comes_from_the_package_metadata() -> None:
    done = devstate("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"devstate {metadata.version('devstate')}"


def test_vm_usage_says_incoming_or_qmp_is_required(tmp_path: Path) -> None:
    helped = devstate("vm", "--help")
    usage = helped.stdout.split("\n\n")[0]
    assert "devstate vm --spec SPEC --incoming URI" in usage
    assert "devstate vm --spec SPEC --qmp unix:PATH [--incoming URI|defer]" in usage
    neither = devstate("vm", "--spec", str(tmp_path / "m.toml"))
    assert neither.returncode == Exit.USAGE
    assert "--incoming URI" in neither.stderr and "--qmp unix:PATH" in neither.stderr


def test_exit_statuses_are_distinct_and_unverified_is_not_a_usage_error() -> None:
    assert len({int(e) for e in Exit}) == len(Exit)
    assert (Exit.USAGE, Exit.UNVERIFIED, Exit.TERMINATED) == (2, 3, 143)
    assert status_of([SimpleNamespace(verified=True)]) is Exit.OK
    assert status_of([SimpleNamespace(verified=True),
                      SimpleNamespace(verified=False)]) is Exit.UNVERIFIED
    assert "3 migrated but not verified" in " ".join(devstate("--help").stdout.split())


def test_json_failure_is_a_json_error_object_with_the_exit_status(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[devices]]\nname = "x"\nsize = 0\n')
    done = devstate("migrate", "--spec", str(bad), "--json")
    assert done.returncode == Exit.ERROR
    assert json.loads(done.stdout) == {"error": {"class": "SpecError",
                                                 "desc": f"{bad}: devices[0].size: "
                                                         "must be > 0"}}


# Run devstate as its console script does, with an import of the runtime held until the
# test has sent its Ctrl-C: "during start-up" without guessing at timings.
_HELD_IMPORT = """
import sys, time
class Hold:
    def find_spec(self, name, path=None, target=None):
        if name == "uvloop":
            print("importing", flush=True)
            time.sleep(60)
        return None
sys.meta_path.insert(0, Hold())
from devstate.cli import main
sys.exit(main(["migrate", "--spec", sys.argv[1]]))
"""


def test_ctrl_c_during_start_up_exits_quietly() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _HELD_IMPORT, ONE_NIC],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "importing\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == Exit.INTERRUPTED
    assert "Traceback" not in err and "interrupted" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # a source's pools start before it connects
def test_a_url_style_address_is_read_as_meant() -> None:
    port = _free_port()
    done = devstate("migrate", "--spec", ONE_NIC, "--to", f"tcp://127.0.0.1:{port}")
    assert done.returncode == Exit.ERROR
    assert f"cannot connect to tcp:127.0.0.1:{port}: Connection refused" in done.stderr


@pytest.mark.slow  # a destination's pools
@pytest.mark.parametrize("flag,said", [("--incoming", "ready"), ("--qmp", "qmp")])
def test_a_second_vm_on_a_socket_in_use_is_refused_and_sigterm_is_143(
        tmp_path: Path, flag: str, said: str) -> None:
    sock = tmp_path / "in.sock"
    vm = [sys.executable, "-m", "devstate", "vm", "--spec", ONE_NIC, flag, f"unix:{sock}",
          "--workers", "1"]
    first = subprocess.Popen(vm, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == f"{said} unix:{sock}"
        second = devstate(*vm[3:])
        assert second.returncode == Exit.ERROR
        assert "another process is listening on it" in second.stderr
        assert first.poll() is None and sock.exists()  # the first keeps its socket
        if flag == "--qmp":
            with socket.socket(socket.AF_UNIX) as client:  # and still answers there
                client.connect(str(sock))
                assert b'"QMP"' in client.recv(4096)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == Exit.TERMINATED, err
    assert "terminated; everything it started was stopped" in err and "Traceback" not in err


def test_report_writes_the_format_its_suffix_names_or_refuses(tmp_path: Path) -> None:
    source = tmp_path / "r.json"
    source.write_text(json.dumps(report()))
    svg = tmp_path / "t.svg"
    done = devstate("report", str(source), "--png", str(svg))
    assert done.returncode == 0, done.stderr
    assert b"<svg" in svg.read_bytes()[:1000]
    pdf = tmp_path / "t.pdf"
    assert devstate("report", str(source), "-o", str(pdf)).returncode == 0
    assert pdf.read_bytes().startswith(b"%PDF")
    gif = devstate("report", str(source), "--out", str(tmp_path / "t.gif"))
    assert gif.returncode == Exit.ERROR and "must end in .png, .svg, .pdf" in gif.stderr
    assert not (tmp_path / "t.gif").exists()


@pytest.mark.slow  # three small migrations
def test_the_learned_cost_model_is_named_kept_from_capped_runs_and_reset(
        tmp_path: Path) -> None:
    costs = tmp_path / "costs.json"
    first = devstate("migrate", "--spec", ONE_NIC, "--costs", str(costs), "--json")
    assert first.returncode == 0, first.stderr
    learned = costs.read_bytes()
    before = os.stat(costs).st_mtime_ns
    capped = devstate("migrate", "--spec", ONE_NIC, "--costs", str(costs),
                      "--max-bandwidth", "64MiB/s", "--json")
    assert capped.returncode == 0, capped.stderr
    unlearned = devstate("migrate", "--spec", ONE_NIC, "--costs", str(costs), "--no-learn")
    assert unlearned.returncode == 0, unlearned.stderr
    assert costs.read_bytes() == learned and os.stat(costs).st_mtime_ns == before
    # The cap is in the estimate: 32 MiB on one of two channels at 32 MiB/s is ~1 s.
    assert json.loads(capped.stdout)["expected_ms"] > 1000
    shown = devstate("costs", "show", "--costs", str(costs), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["stored"] is True
    assert devstate("costs", "reset", "--costs", str(costs)).returncode == 0
    assert not costs.exists()
    assert json.loads(devstate("costs", "show", "--costs", str(costs),
                               "--json").stdout)["stored"] is False


# The command that started a migration says its error; the code that fails only logs it at
# info level, so that it is said once on each side.
@pytest.mark.slow  # a migration whose destination fails
def test_a_failure_is_said_once_on_each_side(tmp_path: Path) -> None:
    sock = tmp_path / "in.sock"
    dest = subprocess.Popen([sys.executable, "-m", "devstate", "vm", "--spec", ONE_NIC,
                             "--incoming", f"unix:{sock}", "--once", "--workers", "1",
                             "--fault", "put:kill-worker"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert dest.stdout is not None and dest.stdout.readline().startswith("ready")
        source = devstate("migrate", "--spec", ONE_NIC, "--to", f"unix:{sock}")
        _, dest_err = dest.communicate(timeout=60)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    assert source.returncode == Exit.ERROR
    assert source.stderr.count("worker 0 was lost") == 1, source.stderr
    assert dest_err.count("worker 0 was lost") == 1, dest_err


@pytest.mark.slow  # seven short runs
def test_ctrl_c_at_any_point_of_the_start_is_one_line_and_130() -> None:
    """Wherever a Ctrl-C lands while the pools, VMs and destination start (imports, worker
    processes starting, channels connecting), the command says one line and exits 130:
    no traceback, no "never retrieved" noise, whatever the delay hits."""
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.2):
        proc = subprocess.Popen([sys.executable, "-m", "devstate", "migrate", "--spec",
                                 ONE_NIC], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(delay)  # where it lands varies; the outcome must not
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # finished before the signal: nothing to interrupt
        assert proc.returncode == Exit.INTERRUPTED, (delay, err)
        assert "Traceback" not in err and "never retrieved" not in err, (delay, err)
        assert len(err.strip().splitlines()) == 1, (delay, err)
