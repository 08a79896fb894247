"""Two hosts on one machine: a source and a destination network namespace on a shaped link.

Migration tests need the source and destination processes to talk over a real TCP path
with the properties of a real network: a rate limit per flow (so N parallel connections get
N times the bandwidth of one, as on links that police or pace each flow), optionally an
aggregate rate, and a delay. :func:`two_hosts` builds that from two namespaces joined by a
veth pair; all traffic stays on the pair's own addresses.

How the shaping is built, and why (the test VM's kernel has HTB, TBF, cls_u32, cls_bpf,
act_mirred and TUN, but neither ``sch_fq`` nor ``sch_netem``, and loads no modules):

* Per-flow rate: ``fq maxrate`` is missing, so each veth end gets an HTB root with one
  leaf class per flow bucket, each capped at the flow rate. A classic-BPF ``cls_bpf``
  filter puts a TCP/UDP packet in bucket ``(sport ^ dport) % 1024``. Each namespace's
  ephemeral ports are confined to 1024 consecutive numbers, so connections to one server
  port always land in distinct buckets: the limit is exactly per flow, never shared by
  accident. Everything else (ARP, ICMP, fragments) shares one default class.
* Aggregate rate: the leaves hang under one parent class at that rate and borrow from it.
* Delay: netem is missing, so each namespace redirects its incoming IPv4 packets (tc
  ingress, ``mirred``) to a TUN device whose owner, ``netns_delay.py``, hands each packet
  back to the kernel ``delay_ms`` later. That module's docstring says why on the
  receiving side.

Names carry the creating pid (``dsnet-<pid>-<n>-...``) so parallel runs do not collide and
a later run can delete what a killed one left (:func:`sweep_stale_namespaces`).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstate.arena.slots import pid_alive

PREFIX = "dsnet-"
# Where `ip netns add` pins a namespace; a name there is a namespace `ip netns list` shows.
NETNS_DIR = Path("/run/netns")
# Each namespace is its own world, so every veth end and delay device has the same name.
VETH = "veth0"
DELAY_DEV = "delay0"
DELAY_SCRIPT = Path(__file__).with_name("netns_delay.py")

# Flow buckets (HTB leaf classes per veth end). 1024 classes take ~50 ms to create; the
# same number of ephemeral ports is the most connections one client can hold open to one
# server port, and tcp_tw_reuse lets it reuse ports whose connections closed over 1 s ago.
FLOW_BUCKETS = 1024
EPHEMERAL_PORTS = (40000, 40000 + FLOW_BUCKETS - 1)
_FIRST_FLOW_MINOR = 0x100  # HTB class minors 1:100 .. 1:4ff are the buckets
_DEFAULT_MINOR = 0x2  # class 1:2 takes whatever is not a TCP or UDP flow
# HTB's DRR quantum in bytes. Without one, HTB derives it from the rate and logs a kernel
# warning when that is out of range; 64 KiB is one GSO segment, so a turn sends one.
_QUANTUM = 65536
_SETUP_TIMEOUT = 10.0

_instances = itertools.count()


class NetnsError(RuntimeError):
    """A command that builds or removes the two hosts failed; the message shows it."""


@dataclass(frozen=True)
class Link:
    """Shaping of the veth link, applied to each direction separately."""

    flow_rate_mbit: float | None = None  # cap on each TCP/UDP flow
    rate_mbit: float | None = None  # cap on all traffic together
    delay_ms: float = 0.0  # one-way delay

    def __post_init__(self) -> None:
        for rate in (self.flow_rate_mbit, self.rate_mbit):
            if rate is not None and rate <= 0:
                raise ValueError(f"rates must be positive, not {rate}")
        if self.delay_ms < 0:
            raise ValueError(f"delay must not be negative, not {self.delay_ms}")


UNSHAPED = Link()


@dataclass(frozen=True)
class TwoHosts:
    """The two namespaces of a :func:`two_hosts` link; ``side`` is "source" or "dest"."""

    source_ns: str
    dest_ns: str
    source_ip: str
    dest_ip: str

    def namespace(self, side: str) -> str:
        """The namespace of ``side``."""
        if side == "source":
            return self.source_ns
        if side == "dest":
            return self.dest_ns
        raise ValueError(f'side must be "source" or "dest", not {side!r}')

    def command(self, side: str, argv: list[str]) -> list[str]:
        """``argv`` made to run inside ``side``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(side), *argv]

    def popen(self, side: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``side``'s namespace; ``kw`` go to :class:`subprocess.Popen`."""
        return subprocess.Popen(self.command(side, argv), **kw)


def run(argv: list[str], *, input: str | None = None) -> str:
    """Run a setup command; return its stdout, or raise :class:`NetnsError` with stderr."""
    try:
        done = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=_SETUP_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{shlex.join(argv)}` could not run: {exc}") from exc
    if done.returncode != 0:
        raise NetnsError(
            f"`{shlex.join(argv)}` exited {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


# ---------------------------------------------------------------------------------------
# Shaping


# Classic BPF opcodes (<linux/filter.h>) of the flow classifier.
_LDB_ABS, _LDH_ABS, _LDH_IND, _LDXB_MSH = 0x30, 0x28, 0x48, 0xB1
_JEQ_K, _JSET_K = 0x15, 0x45
_ST, _LDX_MEM = 0x02, 0x61
_XOR_X, _AND_K, _ADD_K = 0xAC, 0x54, 0x04
_RET_A, _RET_K = 0x16, 0x06
_ETH = 14  # cls_bpf sees the packet from its Ethernet header


def flow_classifier() -> str:
    """``tc ... bpf bytecode`` argument: classid 1:(0x100 + (sport ^ dport) % 1024).

    cls_bpf takes a classic program's return value as the classid (0: no match, so the
    HTB default class). XOR of the two ports gives both directions of a connection the
    same bucket, on whichever end the server is.
    """
    program = [
        (_LDB_ABS, 0, 0, _ETH + 9),  # 0: A = IP protocol
        (_JEQ_K, 2, 0, 6),  # 1: TCP? -> 4
        (_JEQ_K, 1, 0, 17),  # 2: UDP? -> 4
        (_RET_K, 0, 0, 0),  # 3: no ports: default class
        (_LDH_ABS, 0, 0, _ETH + 6),  # 4: A = flags and fragment offset
        (_JSET_K, 9, 0, 0x1FFF),  # 5: a later fragment has no ports -> 15
        (_LDXB_MSH, 0, 0, _ETH),  # 6: X = IP header length
        (_LDH_IND, 0, 0, _ETH),  # 7: A = source port
        (_ST, 0, 0, 0),  # 8: M[0] = A
        (_LDH_IND, 0, 0, _ETH + 2),  # 9: A = destination port
        (_LDX_MEM, 0, 0, 0),  # 10: X = M[0]
        (_XOR_X, 0, 0, 0),  # 11: A ^= X
        (_AND_K, 0, 0, FLOW_BUCKETS - 1),  # 12: A = bucket
        (_ADD_K, 0, 0, (1 << 16) | _FIRST_FLOW_MINOR),  # 13: A = classid
        (_RET_A, 0, 0, 0),  # 14
        (_RET_K, 0, 0, 0),  # 15: default class
    ]
    return ",".join([str(len(program)), *(f"{op} {jt} {jf} {k}" for op, jt, jf, k in program)])


def _bits(mbit: float) -> str:
    return f"{max(1, round(mbit * 1e6))}bit"


def shaping_commands(link: Link, dev: str = VETH) -> list[str]:
    """The ``tc -batch`` lines that rate-limit ``dev``'s egress (none if no rate is set)."""
    if link.flow_rate_mbit is None and link.rate_mbit is None:
        return []
    lines = [f"qdisc add dev {dev} root handle 1: htb default {_DEFAULT_MINOR:x}"]
    minors = [_DEFAULT_MINOR]
    if link.flow_rate_mbit is not None:
        minors += range(_FIRST_FLOW_MINOR, _FIRST_FLOW_MINOR + FLOW_BUCKETS)
    if link.rate_mbit is None:
        assert link.flow_rate_mbit is not None
        parent, rate = "1:", _bits(link.flow_rate_mbit)
        ceil = rate
    else:
        # A leaf below its own rate sends without asking its parent, so the leaves'
        # guaranteed rates must add up to no more than the aggregate: they borrow the rest.
        lines.append(
            f"class add dev {dev} parent 1: classid 1:1 htb rate {_bits(link.rate_mbit)} "
            f"ceil {_bits(link.rate_mbit)} quantum {_QUANTUM}"
        )
        parent, rate = "1:1", _bits(link.rate_mbit / len(minors))
        ceil = _bits(min(link.rate_mbit, link.flow_rate_mbit or link.rate_mbit))
    lines += [
        f"class add dev {dev} parent {parent} classid 1:{minor:x} htb rate {rate} "
        f"ceil {ceil} quantum {_QUANTUM}"
        for minor in minors
    ]
    if link.flow_rate_mbit is not None:
        lines.append(
            f'filter add dev {dev} parent 1: protocol ip prio 1 bpf bytecode "{flow_classifier()}"'
        )
    return lines


def delay_commands(dev: str = VETH, delay_dev: str = DELAY_DEV) -> list[str]:
    """The ``tc -batch`` lines that send ``dev``'s incoming IPv4 through the delay line."""
    return [
        f"qdisc add dev {dev} clsact",
        f"filter add dev {dev} ingress protocol ip prio 1 u32 match u32 0 0 "
        f"action mirred egress redirect dev {delay_dev}",
    ]


# ---------------------------------------------------------------------------------------
# Namespaces


def write_sysctls(ns: str, params: dict[str, str]) -> None:
    """Set ``net.*`` sysctls of namespace ``ns``.

    /proc/sys/net shows the namespace of the process that opens it, so the writer must run
    inside; Python is used because the ``sysctl`` binary (procps) may not be installed.
    """
    code = (
        "import sys\n"
        "for kv in sys.argv[1:]:\n"
        "    key, value = kv.split('=', 1)\n"
        "    with open('/proc/sys/' + key.replace('.', '/'), 'w') as f:\n"
        "        f.write(value)\n"
    )
    args = [f"{key}={value}" for key, value in params.items()]
    run(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args])


def subnet(pid: int, serial: int) -> tuple[str, str]:
    """Source and destination address of instance ``serial`` of process ``pid``: a /30.

    10.0.0.0/8 holds 2**22 /30 blocks: 16 bits of pid and 6 of serial. The namespaces
    isolate each pair anyway; distinct addresses only keep logs and captures unambiguous.
    """
    block = ((pid & 0xFFFF) << 6) | (serial & 0x3F)
    base = int(ipaddress.IPv4Address("10.0.0.0")) | (block << 2)
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def list_namespaces() -> list[str]:
    """Names ``ip netns list`` shows."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line]


def delete_namespace(ns: str) -> None:
    """End every process left in ``ns`` and delete it (and with it its devices).

    A process inside keeps a namespace alive after ``ip netns delete``, unseen, with its
    veth; the namespace is this module's, so what runs in it goes with it.
    """
    if not (NETNS_DIR / ns).exists():
        return
    for pid in run(["ip", "netns", "pids", ns]).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "delete", ns])


def sweep_stale_namespaces() -> None:
    """Delete namespaces this module made in processes that are gone (killed runs)."""
    for ns in list_namespaces():
        pid = ns[len(PREFIX) :].split("-", 1)[0]
        if ns.startswith(PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
            delete_namespace(ns)


def start_delay_line(ns: str, delay_ms: float) -> subprocess.Popen[str]:
    """Start ``netns_delay.py`` in ``ns`` and wait until its device exists."""
    argv = [sys.executable, str(DELAY_SCRIPT), DELAY_DEV, str(delay_ms)]
    # stderr goes to a file, not a pipe nobody drains: a chatty line must never block.
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, stderr=errors, text=True
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], _SETUP_TIMEOUT)
        if ready and proc.stdout.readline().strip() == "ready":
            return proc
        stop_delay_line(proc)
        errors.seek(0)
        message = errors.read().strip() or "no output"
    raise NetnsError(f"delay line in {ns} did not start: {message}")


def stop_delay_line(proc: subprocess.Popen[str]) -> None:
    """Stop a delay line and reap it."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def set_up_host(ns: str, address: str, link: Link) -> subprocess.Popen[str] | None:
    """Address, shape and (if delayed) start the delay line of one end; return the line."""
    run(["ip", "-n", ns, "addr", "add", f"{address}/30", "dev", VETH])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "link", "set", VETH, "up"])
    write_sysctls(ns, {
        "net.ipv4.ip_local_port_range": f"{EPHEMERAL_PORTS[0]} {EPHEMERAL_PORTS[1]}",
        "net.ipv4.tcp_tw_reuse": "1",
    })
    batch = shaping_commands(link)
    line = None
    if link.delay_ms > 0:
        line = start_delay_line(ns, link.delay_ms)
        run(["ip", "-n", ns, "link", "set", DELAY_DEV, "up"])
        # Delayed packets come in on the TUN device while the route back to their sender is
        # the veth: strict reverse-path filtering would drop them.
        write_sysctls(ns, {
            "net.ipv4.conf.all.rp_filter": "0",
            f"net.ipv4.conf.{DELAY_DEV}.rp_filter": "0",
        })
        batch += delay_commands()
    if batch:
        # One tc process for all ~1000 classes; on failure tc names the line.
        run(["tc", "-n", ns, "-batch", "-"], input="".join(f"{cmd}\n" for cmd in batch))
    return line


@contextlib.contextmanager
def two_hosts(link: Link = UNSHAPED, *, name: str | None = None) -> Iterator[TwoHosts]:
    """Two namespaces joined by a veth pair shaped by ``link``; removed on every exit.

    ``name`` is an optional label added to the namespace names, for people reading
    ``ip netns list``. Processes still running in the namespaces at exit are killed.
    """
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_.]{1,32}", name):
        raise ValueError(f"name must be 1-32 letters, digits, '_' or '.', not {name!r}")
    serial = next(_instances)
    base = f"{PREFIX}{os.getpid()}-{serial}" + (f"-{name}" if name else "")
    hosts = TwoHosts(f"{base}-src", f"{base}-dst", *subnet(os.getpid(), serial))
    made: list[str] = []
    lines: list[subprocess.Popen[str]] = []
    try:
        sweep_stale_namespaces()
        for ns in (hosts.source_ns, hosts.dest_ns):
            made.append(ns)  # before the command, so an interrupt cannot orphan it
            run(["ip", "netns", "add", ns])
        # Made directly inside the namespaces: no name is ever taken in the root namespace.
        run(["ip", "link", "add", VETH, "netns", hosts.source_ns, "type", "veth",
             "peer", "name", VETH, "netns", hosts.dest_ns])
        for ns, address in ((hosts.source_ns, hosts.source_ip), (hosts.dest_ns, hosts.dest_ip)):
            line = set_up_host(ns, address, link)
            if line is not None:
                lines.append(line)
        yield hosts
    finally:
        tear_down(made, lines)


def tear_down(namespaces: list[str], lines: list[subprocess.Popen[str]]) -> None:
    """Stop the delay lines and delete the namespaces, all of them even if one fails."""
    for line in lines:
        stop_delay_line(line)
    failures = []
    for ns in namespaces:
        try:
            delete_namespace(ns)
        except NetnsError as exc:
            failures.append(str(exc))
    if failures:
        raise NetnsError("; ".join(failures))


# ---------------------------------------------------------------------------------------
# Availability


@functools.cache
def netns_unavailable() -> str | None:
    """Why two shaped hosts cannot be made here, or None if they can (tried once, cached)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2 (apt-get install -y iproute2)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing: the delay line needs the kernel's TUN driver"
    try:
        with two_hosts(Link(flow_rate_mbit=100, rate_mbit=100, delay_ms=1), name="probe"):
            pass
    except (NetnsError, OSError) as exc:
        return f"cannot build two shaped namespaces here: {exc}"
    return None


def require_netns() -> None:
    """Skip the calling test, saying what is missing, if :func:`two_hosts` cannot work."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
