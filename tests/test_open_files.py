"""Out of file descriptors (issue 18, item 6): a clear one-line error before anything
starts, nothing left in /dev/shm; a soft limit the hard one allows to raise is raised."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from tests.test_cli import EXAMPLES

ONE_NIC = str(EXAMPLES / "one-nic-32mib.toml")


def _segments_of(pid: int) -> set[str]:
    """The arenas process ``pid`` created (named devstate-PID-...), still in /dev/shm."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"devstate-{pid}-")}


def _run(args: list[str], soft: int, hard: int) -> tuple[int, str, str, int]:
    """Run devstate with the limit (soft, hard): its status, stdout, stderr and pid."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    proc = subprocess.Popen([sys.executable, "-m", "devstate", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, preexec_fn=limit)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, proc.pid


@pytest.mark.parametrize("args", [
    ["migrate", "--spec", ONE_NIC],
    ["vm", "--spec", ONE_NIC, "--qmp", "unix:/tmp/devstate-test-fds.sock"],
    ["demo"],
], ids=["migrate", "vm-qmp", "demo"])
def test_a_hard_limit_too_low_is_one_line_naming_ulimit_and_leaves_nothing(
        args: list[str]) -> None:
    status, _, err, pid = _run(args, 20, 20)
    assert status == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "ulimit -n" in lines[0], err
    assert not _segments_of(pid)  # no arena left behind


def test_a_soft_limit_below_the_need_is_raised_and_the_migration_verifies() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit of open files here is {hard}: nothing to raise to")
    status, out, err, _ = _run(["migrate", "--spec", ONE_NIC, "--json"], 20, hard)
    assert status == 0, err
    assert '"verified": true' in out
