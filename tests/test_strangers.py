"""Strangers on a destination's port (issue 18, item 3): a connection that is not a source's
main channel is logged and dropped, and the destination keeps waiting for the real source.

Everything is real: a ``devstate vm --incoming`` process, stray sockets from this test, and
a ``devstate migrate --to`` process that must then complete, verified.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devstate.cli.exits import Exit
from tests.test_cli import EXAMPLES, devstate

ONE_NIC = str(EXAMPLES / "one-nic-32mib.toml")


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=60)


def _hung_up(sock: socket.socket) -> bool:
    """Whether the destination closed ``sock`` (a reset when it left bytes unread)."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


@pytest.mark.slow  # a destination's pools and a source's
@pytest.mark.parametrize("mode", ["once", "runs-on", "qmp"])
def test_strangers_before_the_source_are_dropped_and_the_migration_completes(
        mode: str, tmp_path: Path) -> None:
    once = mode == "once"
    extra = {"once": ["--once"], "runs-on": [], "qmp": ["--qmp", f"unix:{tmp_path}/q.sock"]}
    dest = subprocess.Popen([sys.executable, "-m", "devstate", "vm", "--spec", ONE_NIC,
                             "--incoming", "tcp:127.0.0.1:0", "--workers", "1",
                             "--hello-timeout", "1", *extra[mode]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert dest.stdout is not None
        if mode == "qmp":
            assert dest.stdout.readline().startswith("qmp ")
        ready = dest.stdout.readline().split()
        assert ready[0] == "ready", ready
        port = int(ready[1].rsplit(":", 1)[1])
        _connect(port).close()  # connect and close
        with _connect(port) as http:  # an HTTP client: the destination hangs up on it
            http.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert _hung_up(http)
        with _connect(port) as idle:  # silent past the hello timeout: dropped
            assert _hung_up(idle)
        with _connect(port):  # silent, and still open while the source migrates
            source = devstate("migrate", "--spec", ONE_NIC, "--to",
                              f"tcp:127.0.0.1:{port}", "--json")
        assert source.returncode == Exit.OK, source.stderr
        assert json.loads(source.stdout)["verified"] is True
        if not once:
            assert dest.poll() is None  # the VM runs on after the migration
            dest.terminate()
        _, err = dest.communicate(timeout=60)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    if once:
        assert dest.returncode == Exit.OK, err
    assert "Traceback" not in err
    dropped = [line for line in err.splitlines() if "dropped a connection" in line]
    # The last idle stranger is dropped too if the source took longer than its timeout.
    assert len(dropped) in (3, 4), err
    assert "peer closed before its hello" in dropped[0]
    assert "hello.magic" in dropped[1]
    assert "no hello within 1 s" in dropped[2]
