"""The live progress display: what its line says, and that ``devstate migrate`` draws it on
a terminal and nowhere else."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstate.phase import Phase
from devstate.report.progress import MigrationProgress, SaveProgress
from devstate.report.ram import RamReport

SPEC = {"seed": 3, "vcpus": {"count": 64},
        "devices": [{"name": "nic", "size": "32MiB", "write_bandwidth": "64MiB/s"}]}


def test_the_line_shows_devices_bytes_and_time_against_the_limit() -> None:
    progress = MigrationProgress(downtime_limit_ms=300)
    progress.status(Phase.ACTIVE)
    assert "stopped" not in progress.line().plain
    progress.saved = SaveProgress(40, 65, 16 << 20, 32 << 20)
    progress.status(Phase.DEVICE)
    progress.stopped_at = time.monotonic() - 0.5  # half a second since the stop
    line = progress.line().plain
    assert line.startswith("VM paused, copying")
    assert "saved 40 of 65 devices, 16 MiB read" in line
    assert "of 300 ms limit" in line
    assert progress.line().spans[-1].style == "red"  # past the limit


def test_the_line_shows_a_live_guests_ram_round_until_the_stop() -> None:
    progress = MigrationProgress(downtime_limit_ms=300)
    progress.status(Phase.ACTIVE)
    progress.ram = RamReport(1 << 30, 1200 << 20, 3 << 20, 4, 4, 1500.0, 2e5, 900.0)
    assert "RAM round 4, 3.0 MiB left, guest dirtying 1,500 pages/s" in progress.line().plain
    progress.status(Phase.DEVICE)
    assert "RAM round" not in progress.line().plain  # stopped: the guest dirties nothing


def test_the_line_speaks_plainly_and_never_shows_more_done_than_all() -> None:
    """QEMU's status names are for controllers; and bytes read count records and re-sent
    state, so they are no fraction of the streams' total (once read 739/736 MiB)."""
    progress = MigrationProgress(downtime_limit_ms=None)
    progress.status(Phase.DEVICE)
    progress.saved = SaveProgress(8, 8, 739 << 20, 736 << 20)
    line = progress.line().plain
    assert not line.startswith("device") and "739 MiB read" in line
    assert "/736" not in line and "8 of 8 devices" in line


def _migrate(tmp_path: Path, *extra: str, tty: bool) -> tuple[int, str, str]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    command = [sys.executable, "-m", "devstate", "migrate", "--spec", str(spec), *extra]
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    if not tty:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower, env=env)
        os.close(follower)
        seen = bytearray()
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: every writer has exited
                break
            if not chunk:
                break
            seen += chunk
        out = proc.stdout.read().decode() if proc.stdout else ""
        return proc.wait(timeout=120), out, seen.decode(errors="replace")
    finally:
        os.close(leader)


@pytest.mark.slow  # two migrations on a pty
def test_migrate_draws_progress_on_a_terminal_and_not_for_json(tmp_path: Path) -> None:
    code, out, err = _migrate(tmp_path, tty=True)
    assert code == 0 and "verified bit-exact" in out
    # Redrawn while the 32 MiB move at 64 MiB/s: the stop, devices and bytes were shown.
    assert "saved 65 of 65 devices" in err and "stopped" in err, err[-2000:]
    code, out, err = _migrate(tmp_path, "--json", tty=False)
    assert code == 0 and json.loads(out)["verified"]
    assert "saved" not in err and "\x1b[" not in err
