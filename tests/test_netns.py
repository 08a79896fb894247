"""tests/netns.py measured for real: isolation, per-flow and aggregate rates, delay, teardown.

Rates are goodput (payload bytes over time, slow start included) while HTB counts every
header too, so a flow capped at R moves payload at ~0.95 R: the bounds below allow for
that and for a noisy 2-core machine, and still fail if the cap is missing or shared.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

import pytest
from netns import Link, TwoHosts, list_namespaces, require_netns, two_hosts

# Real network namespaces and shaped links, each flow measured for a second or more.
pytestmark = pytest.mark.slow

PROBE = Path(__file__).with_name("netns_probe.py")
FLOW_MBIT = 80.0
# 6 MB is ~0.6 s at 80 Mbit/s: long enough that slow start is a small part of it.
TRANSFER = 6_000_000


@pytest.fixture(autouse=True)
def _netns() -> None:
    require_netns()


@contextlib.contextmanager
def server(hosts: TwoHosts, side: str = "dest") -> Iterator[int]:
    """Run the probe's server on ``side``'s address; yield its port."""
    address = hosts.dest_ip if side == "dest" else hosts.source_ip
    proc = hosts.popen(
        side, [sys.executable, str(PROBE), "serve", address], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), f"server did not start: {line!r}"
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        proc.stdout.close()


def probe(hosts: TwoHosts, side: str, *args: object) -> Any:
    """Run a probe client on ``side``; return what it printed, parsed."""
    argv = [sys.executable, str(PROBE), *map(str, args)]
    done = subprocess.run(hosts.command(side, argv), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def goodput_mbit(hosts: TwoHosts, port: int, flows: int, *, to: str = "dest") -> float:
    """Mbit/s of payload that ``flows`` parallel connections move together to ``to``."""
    sender, address = ("source", hosts.dest_ip) if to == "dest" else ("dest", hosts.source_ip)
    result = probe(hosts, sender, "send", address, port, flows, TRANSFER)
    return flows * TRANSFER * 8 / result["seconds"] / 1e6


def test_dest_is_reachable_from_source_only() -> None:
    with two_hosts() as hosts, server(hosts) as port:
        # From the source namespace the destination is on a directly attached link...
        result = probe(hosts, "source", "ping", hosts.dest_ip, port, 1, "--dontroute")
        assert len(result["echo"]) == 1
        # ...while the root namespace neither has the addresses nor a link that reaches
        # them. SO_DONTROUTE makes connect fail at once instead of sending a SYN to the
        # default gateway, so this check puts nothing on the real network.
        root_addresses = subprocess.run(
            ["ip", "-o", "addr"], capture_output=True, text=True, check=True
        ).stdout
        assert hosts.dest_ip not in root_addresses
        assert hosts.source_ip not in root_addresses
        with socket.socket() as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_DONTROUTE, 1)
            assert conn.connect_ex((hosts.dest_ip, port)) == errno.ENETUNREACH


def test_each_flow_gets_the_flow_rate() -> None:
    with two_hosts(Link(flow_rate_mbit=FLOW_MBIT)) as hosts, server(hosts) as port:
        one = goodput_mbit(hosts, port, 1)
        four = goodput_mbit(hosts, port, 4)
    assert 0.6 * FLOW_MBIT <= one <= 1.3 * FLOW_MBIT, f"one flow: {one:.1f} Mbit/s"
    assert 2.5 * one <= four <= 4 * 1.3 * FLOW_MBIT, f"four flows: {four:.1f}, one: {one:.1f}"


def test_flow_rate_applies_towards_the_source_too() -> None:
    with two_hosts(Link(flow_rate_mbit=FLOW_MBIT)) as hosts, server(hosts, "source") as port:
        one = goodput_mbit(hosts, port, 1, to="source")
    assert 0.6 * FLOW_MBIT <= one <= 1.3 * FLOW_MBIT, f"one flow: {one:.1f} Mbit/s"


def test_aggregate_rate_caps_flows_together() -> None:
    aggregate = 1.5 * FLOW_MBIT
    link = Link(flow_rate_mbit=FLOW_MBIT, rate_mbit=aggregate)
    with two_hosts(link) as hosts, server(hosts) as port:
        four = goodput_mbit(hosts, port, 4)
    assert 0.6 * aggregate <= four <= 1.3 * aggregate, f"four flows: {four:.1f} Mbit/s"


def test_delay_adds_to_every_round_trip() -> None:
    with two_hosts(Link(delay_ms=20)) as hosts, server(hosts) as port:
        result = probe(hosts, "source", "ping", hosts.dest_ip, port, 5)
    # A connect and a request/answer are one round trip each: 20 ms out, 20 ms back.
    for kind in ("connect", "echo"):
        assert min(result[kind]) >= 0.040, result
        assert median(result[kind]) < 0.100, result


def test_teardown_deletes_namespaces_and_ends_their_processes() -> None:
    with two_hosts(Link(flow_rate_mbit=FLOW_MBIT, delay_ms=1)) as hosts:
        names = {hosts.source_ns, hosts.dest_ns}
        assert names <= set(list_namespaces())
        # Left running on purpose: teardown must end it, or it would keep the namespace.
        sleeper = hosts.popen("dest", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert not names & set(list_namespaces())
    assert sleeper.wait(timeout=5) != 0


def test_teardown_runs_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="body failed"), two_hosts(Link(delay_ms=1)) as hosts:
        names = {hosts.source_ns, hosts.dest_ns}
        raise RuntimeError("body failed")
    assert not names & set(list_namespaces())
