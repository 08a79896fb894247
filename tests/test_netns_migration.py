"""Two hosts on one machine: a migration between two network namespaces over mutual TLS.

The source and destination are separate ``devstate`` processes, each in its own network
namespace, joined only by a veth pair (tests/netns.py); the destination listens on its
namespace's address, and the source reaches it over TCP with four data channels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import Link, TwoHosts, require_netns, two_hosts

from tests.pki import Pki, make_pki

# migrations between network namespaces
pytestmark = pytest.mark.slow

SPEC = {"seed": 21, "vcpus": {"count": 64},
        "devices": [{"name": "gpu", "size": "48MiB"}, {"name": "nic", "size": "8MiB"}]}
READY_TIMEOUT_S = 60


@pytest.fixture(autouse=True)
def _netns() -> None:
    require_netns()


def _devstate(*args: str) -> list[str]:
    return [sys.executable, "-m", "devstate", *args]


def migrate_between(hosts: TwoHosts, spec: Path, pki: Pki | None, source_args: list[str],
                    incoming: str | None = None) -> dict[str, Any]:
    """Run ``devstate vm`` in the destination namespace (on ``incoming``, default its TCP
    address) and ``devstate migrate --to`` it from the source namespace; return the
    source's JSON report."""
    server = ["--tls-ca", pki.server.ca, "--tls-cert", pki.server.cert,
              "--tls-verify-client"] if pki else []
    client = ["--tls-ca", pki.client.ca, "--tls-cert", pki.client.cert] if pki else []
    dest = hosts.popen("dest", _devstate("vm", "--spec", str(spec), "--incoming",
                                         incoming or f"tcp:{hosts.dest_ip}:0", "--once",
                                         *server),
                       stdout=subprocess.PIPE, text=True)
    try:
        assert dest.stdout is not None
        word, _, uri = dest.stdout.readline().strip().partition(" ")
        assert word == "ready", "the destination did not start"
        source = subprocess.run(
            hosts.command("source", _devstate("migrate", "--spec", str(spec), "--to", uri,
                                              "--json", *client, *source_args)),
            capture_output=True, text=True, timeout=120)
        assert source.returncode == 0, source.stderr
        assert dest.wait(timeout=30) == 0
        return json.loads(source.stdout)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    with two_hosts(Link(flow_rate_mbit=2000)) as pair:
        yield pair


@pytest.mark.parametrize("transport", ["mutual-tls", "tcp", "unix"])
def test_four_channels_between_namespaces(hosts, tmp_path, transport: str) -> None:
    """Mutual TLS and plain TCP over the veth link; a Unix socket in the filesystem both
    namespaces share (network namespaces do not separate filesystem sockets)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    pki = make_pki(tmp_path, hosts.dest_ip) if transport == "mutual-tls" else None
    incoming = f"unix:{tmp_path / 'incoming.sock'}" if transport == "unix" else None
    report = migrate_between(hosts, spec, pki, ["--channels", "4", "--routing", "spread",
                                                "--workers", "2"], incoming)
    assert report["verified"] and all(d["verified"] for d in report["devices"])
    assert len(report["devices"]) == 66
