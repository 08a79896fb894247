"""Transports over real sockets: unix, tcp and TLS (trustme certificates), on asyncio and uvloop.

Every test ends with exactly the fds it started with: failures must close what they opened.
Counting fds alone would miss a socket dropped unclosed (the garbage collector closes it),
so an "unclosed socket" ResourceWarning fails the test too.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import random
import socket
import ssl
import stat
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from devstate.errors import ChannelError, DevstateError
from devstate.net import fdio
from devstate.net.tls import TlsConfig, tls_client, tls_server
from devstate.net.transport import Address, Listener, connect, parse_uri

pytestmark = [pytest.mark.filterwarnings("error::ResourceWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]

MiB = 1 << 20
Runner = Callable[[Coroutine[Any, Any, Any]], Any]
# Generous for loopback, short enough that a hang fails the test quickly.
STEP_S = 5.0


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a coroutine on a fresh loop of each kind a process may use."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def same_fds(run: Runner) -> Any:
    """A test must close every socket it (or a failing call) opened."""
    run(asyncio.sleep(0))  # a loop kind's once-per-process setup is not ours to count
    gc.collect()
    before = open_fds()
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    assert open_fds() == before


@dataclass(frozen=True)
class Pki:
    """PEM files from trustme: one trusted CA and one that nobody trusts."""

    ca: str
    server: str  # cert chain and key in one file, for "localhost" and 127.0.0.1
    client_cert: str  # separate cert and key files
    client_key: str
    other_ca: str
    otherhost: str  # signed by the trusted CA, but for "otherhost"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    client = ca.issue_cert("source.example")

    def write(name: str, blob: trustme.Blob) -> str:
        blob.write_to_path(str(d / name))
        return str(d / name)

    return Pki(
        ca=write("ca.pem", ca.cert_pem),
        server=write("server.pem", ca.issue_cert(
            "localhost", "127.0.0.1").private_key_and_cert_chain_pem),
        client_cert=write("client.pem", client.cert_chain_pems[0]),
        client_key=write("client.key", client.private_key_pem),
        other_ca=write("other-ca.pem", other.cert_pem),
        otherhost=write("otherhost.pem", ca.issue_cert(
            "otherhost").private_key_and_cert_chain_pem),
    )


# --- helpers -------------------------------------------------------------------------------

async def socket_pair(uri: str = "tcp:127.0.0.1:0") -> tuple[socket.socket, socket.socket]:
    """(accepted, connected) through a real Listener; the listener is gone afterwards."""
    with Listener(parse_uri(uri)) as listener:
        accepting = asyncio.ensure_future(listener.accept())
        client = await connect(listener.address, timeout_s=STEP_S)
        return await accepting, client


async def tls_pair(server_tls: TlsConfig, client_tls: TlsConfig, hostname: str = "localhost",
                   ) -> tuple[ssl.SSLSocket | BaseException, ssl.SSLSocket | BaseException]:
    """Both handshakes at once; each result is its socket or the exception it raised."""
    server, client = await socket_pair()
    results = await asyncio.gather(
        tls_server(server, server_tls, timeout_s=STEP_S),
        tls_client(client, client_tls, hostname, timeout_s=STEP_S),
        return_exceptions=True)
    return results[0], results[1]


def buffers_of(payload: bytes, seed: int, *, small_only: bool = False) -> list[memoryview]:
    """``payload`` cut into tiny-to-16 KiB buffers and (unless small_only) 1 MiB ones."""
    rng = random.Random(seed)
    view, out, at = memoryview(payload), [], 0
    while at < len(view):
        big = not small_only and rng.random() < 0.05
        n = MiB if big else rng.choice((1, 7, 64, 300, 4096, 16383, 16384, 20000))
        out.append(view[at:at + n])
        at += n
    return out


async def receive(sock: socket.socket, total: int, seed: int) -> bytes:
    """Read ``total`` bytes in randomly sized recv_exactly calls (headers, then payloads)."""
    rng = random.Random(seed)
    buf = bytearray(total)
    view, at = memoryview(buf), 0
    while at < total:
        n = min(total - at, rng.choice((1, 40, 1000, 70000, MiB)))
        assert await fdio.recv_exactly(sock, view[at:at + n])
        at += n
    return bytes(buf)


async def transfer(sender: socket.socket, receiver: socket.socket, payload: bytes,
                   seed: int, **cut: bool) -> None:
    """Send ``payload`` one way and check it arrives intact."""
    async with asyncio.timeout(STEP_S * 2):
        _, got = await asyncio.gather(fdio.send_all(sender, buffers_of(payload, seed, **cut)),
                                      receive(receiver, len(payload), seed))
    assert got == payload


def close_all(*socks: object) -> None:
    for sock in socks:
        if isinstance(sock, socket.socket):
            sock.close()


# --- parse_uri -----------------------------------------------------------------------------

@pytest.mark.parametrize(("uri", "address"), [
    ("unix:/run/devstate.sock", Address("unix", path="/run/devstate.sock")),
    ("unix:relative/x.sock", Address("unix", path="relative/x.sock")),
    ("tcp:localhost:4444", Address("tcp", host="localhost", port=4444)),
    ("tcp:192.0.2.7:65535", Address("tcp", host="192.0.2.7", port=65535)),
    ("tcp:[::1]:0", Address("tcp", host="::1", port=0)),
    ("tcp:[fe80::1%eth0]:80", Address("tcp", host="fe80::1%eth0", port=80)),
])
def test_good_uris_round_trip(uri: str, address: Address) -> None:
    assert parse_uri(uri) == address
    assert str(address) == uri
    assert pickle.loads(pickle.dumps(address)) == address


@pytest.mark.parametrize(("uri", "says"), [
    ("", "unknown transport"),
    ("/tmp/x.sock", "unknown transport"),
    ("udp:host:1", "unknown transport 'udp'"),
    ("unix:", "empty path"),
    ("tcp:localhost", "missing port"),
    ("tcp:localhost:", "missing port"),
    ("tcp:localhost:http", "not a number"),
    ("tcp:localhost:+80", "not a number"),
    ("tcp:localhost:65536", "out of range"),
    ("tcp::4444", "empty host"),
    ("tcp:::1:4444", "must be in brackets"),
    ("tcp:[::1:4444", "missing ']'"),
    ("tcp:[::1]", "missing port"),
    ("tcp:[::1]4444", "missing port"),
    ("tcp:[not-v6]:4444", "not an IPv6 address"),
])
def test_malformed_uris_say_what_is_wrong(uri: str, says: str) -> None:
    with pytest.raises(DevstateError, match="channel URI") as caught:
        parse_uri(uri)
    assert says in str(caught.value)


def test_tls_config_is_picklable_and_checks_its_files(pki: Pki, tmp_path: Path) -> None:
    tls = TlsConfig(ca=pki.ca, cert=pki.server, verify_client=True)
    assert pickle.loads(pickle.dumps(tls)) == tls
    assert tls.server_context().verify_mode == ssl.CERT_REQUIRED
    client = TlsConfig(ca=pki.ca).client_context()
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ChannelError, match="needs a certificate"):
        TlsConfig(ca=pki.ca).server_context()
    with pytest.raises(ChannelError, match="cannot load CA file .*missing.pem"):
        TlsConfig(ca=str(tmp_path / "missing.pem")).client_context()
    with pytest.raises(ChannelError, match="cannot load certificate"):
        TlsConfig(ca=pki.ca, cert=pki.ca).client_context()  # a cert without its key


# --- listeners and plaintext ---------------------------------------------------------------

def test_tcp_carries_mixed_buffers_intact(run: Runner) -> None:
    payload = random.Random(1).randbytes(8 * MiB)

    async def main() -> None:
        server, client = await socket_pair()
        try:
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert not client.getblocking() and not server.getblocking()
            await transfer(client, server, payload, seed=2)
        finally:
            close_all(server, client)
    run(main())


def test_tcp_listener_reports_its_port_and_ipv6_works(run: Runner) -> None:
    listener = Listener(parse_uri("tcp:[::1]:0"))
    try:
        listener.open()
    except ChannelError:
        pytest.skip("no IPv6 loopback here")
    listener.close()
    assert listener.address.host == "::1" and listener.address.port != 0
    assert str(listener.address) == f"tcp:[::1]:{listener.address.port}"

    async def main() -> None:
        server, client = await socket_pair("tcp:[::1]:0")
        try:
            await transfer(server, client, b"v6" * 1000, seed=3)
        finally:
            close_all(server, client)
    run(main())


def test_unix_listener_is_private_and_cleans_up(run: Runner, tmp_path: Path) -> None:
    path = tmp_path / "dest.sock"
    path.write_text("stale")
    address = parse_uri(f"unix:{path}")

    async def main() -> None:
        with Listener(address) as listener:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert listener.address == address
            accepting = asyncio.ensure_future(listener.accept())
            client = await connect(address)
            server = await accepting
        assert not path.exists()
        try:
            await transfer(client, server, random.Random(4).randbytes(3 * MiB), seed=5)
        finally:
            close_all(server, client)
    run(main())
    listener = Listener(address)
    listener.close()
    listener.close()  # idempotent, even never opened


def test_listen_failures_name_the_address(run: Runner, tmp_path: Path) -> None:
    with Listener(parse_uri("tcp:127.0.0.1:0")) as taken:
        assert taken.address.port != 0
        with pytest.raises(ChannelError, match=f"cannot listen on {taken.address}"):
            Listener(taken.address).open()
    bad = parse_uri(f"unix:{tmp_path}/no/such/dir.sock")
    with pytest.raises(ChannelError, match=f"cannot listen on {bad}"):
        Listener(bad).open()


def test_refused_and_unresolvable_connections_name_the_address(run: Runner) -> None:
    # A bound socket that does not listen: its port refuses, and stays ours meanwhile.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        refused = Address("tcp", host="127.0.0.1", port=holder.getsockname()[1])
        with pytest.raises(ChannelError, match=f"cannot connect to {refused}: .*refused"):
            run(connect(refused, timeout_s=STEP_S))
    with pytest.raises(ChannelError, match="cannot connect to tcp:nothing.invalid:1: "):
        run(connect(parse_uri("tcp:nothing.invalid:1"), timeout_s=STEP_S))
    with pytest.raises(ChannelError, match="cannot connect to unix:/nonexistent/x.sock"):
        run(connect(parse_uri("unix:/nonexistent/x.sock")))
    with pytest.raises(ChannelError, match="timed out"):
        run(connect(refused, timeout_s=0.0))


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_peer_closing_mid_stream_is_a_connection_error(run: Runner, pki: Pki, tls: bool) -> None:
    async def main() -> None:
        if tls:
            server, client = await tls_pair(TlsConfig(ca=pki.ca, cert=pki.server),
                                            TlsConfig(ca=pki.ca))
        else:
            server, client = await socket_pair()
        assert isinstance(server, socket.socket) and isinstance(client, socket.socket)
        try:
            await fdio.send_all(client, [b"x" * 100])
            client.close()
            async with asyncio.timeout(STEP_S):
                with pytest.raises(ConnectionError):
                    await fdio.recv_exactly(server, memoryview(bytearray(200)))
        finally:
            close_all(server, client)
    run(main())


def test_plain_close_between_messages_is_a_clean_end(run: Runner) -> None:
    async def main() -> None:
        server, client = await socket_pair()
        client.close()
        try:
            assert not await fdio.recv_exactly(server, memoryview(bytearray(8)))
        finally:
            server.close()
    run(main())


# --- TLS -----------------------------------------------------------------------------------

@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_tls_carries_bytes_both_ways_at_once(run: Runner, pki: Pki, hostname: str) -> None:
    up, down = random.Random(6).randbytes(8 * MiB), random.Random(7).randbytes(8 * MiB)

    async def main() -> None:
        server, client = await tls_pair(TlsConfig(ca=pki.ca, cert=pki.server),
                                        TlsConfig(ca=pki.ca), hostname)
        assert isinstance(server, ssl.SSLSocket) and isinstance(client, ssl.SSLSocket)
        try:
            assert not client.getblocking() and not server.getblocking()
            assert client.version() == "TLSv1.3"
            await asyncio.gather(transfer(client, server, up, seed=8),
                                 transfer(server, client, down, seed=9))
        finally:
            close_all(server, client)
    run(main())


def test_tls_many_small_buffers_and_one_large(run: Runner, pki: Pki) -> None:
    small = random.Random(10).randbytes(2 * MiB)

    async def main() -> None:
        server, client = await tls_pair(TlsConfig(ca=pki.ca, cert=pki.server),
                                        TlsConfig(ca=pki.ca))
        assert isinstance(server, ssl.SSLSocket) and isinstance(client, ssl.SSLSocket)
        try:
            await transfer(client, server, small, seed=11, small_only=True)
            await transfer(server, client, small[:MiB], seed=12)  # one 1 MiB buffer or so
            big = bytes(MiB)
            async with asyncio.timeout(STEP_S):
                _, got = await asyncio.gather(fdio.send_all(client, [big]),
                                              receive(server, MiB, seed=13))
            assert got == big
        finally:
            close_all(server, client)
    run(main())


def test_coalescing_keeps_order_and_leaves_large_buffers_alone() -> None:
    views = [memoryview(bytes([i % 256]) * n)
             for i, n in enumerate([10, 20, MiB, 5, *[10000] * 60, fdio.TLS_SMALL_BYTES, 1])]
    out = list(fdio._coalesced(views))
    assert b"".join(out) == b"".join(views)
    assert any(o is views[2] for o in out) and any(o is views[-2] for o in out)
    joined = [o for o in out if isinstance(o, bytes)]
    assert joined and all(len(o) < fdio.TLS_BATCH_BYTES + fdio.TLS_SMALL_BYTES for o in joined)
    # [10, 20] [MiB] [5, 27 x 10000] [27 x 10000] [6 x 10000] [16 KiB] [1]: a batch closes
    # at the first buffer that takes it to TLS_BATCH_BYTES or more.
    assert [len(o) for o in out] == [30, MiB, 270005, 270000, 60000, fdio.TLS_SMALL_BYTES, 1]


def test_mutual_tls_accepts_a_client_certificate(run: Runner, pki: Pki) -> None:
    async def main() -> None:
        server, client = await tls_pair(
            TlsConfig(ca=pki.ca, cert=pki.server, verify_client=True),
            TlsConfig(ca=pki.ca, cert=pki.client_cert, key=pki.client_key))
        assert isinstance(server, ssl.SSLSocket) and isinstance(client, ssl.SSLSocket)
        try:
            peer = server.getpeercert()
            assert peer and ("DNS", "source.example") in peer["subjectAltName"]
            await transfer(client, server, b"hello" * 1000, seed=14)
        finally:
            close_all(server, client)
    run(main())


def test_mutual_tls_refuses_a_client_without_certificate(run: Runner, pki: Pki) -> None:
    async def main() -> None:
        server, client = await tls_pair(
            TlsConfig(ca=pki.ca, cert=pki.server, verify_client=True), TlsConfig(ca=pki.ca))
        assert isinstance(server, ChannelError), server
        assert "TLS handshake" in str(server) and "certificate" in str(server)
        if isinstance(client, ssl.SSLSocket):
            # TLS 1.3: the client finishes first and hears of the refusal on its next read.
            try:
                async with asyncio.timeout(STEP_S):
                    with pytest.raises(ConnectionError):
                        await fdio.recv_exactly(client, memoryview(bytearray(1)))
            finally:
                client.close()
        else:
            assert isinstance(client, ChannelError), client
    run(main())


@pytest.mark.parametrize(("case", "says"), [
    ("untrusted", "certificate verify failed: self-signed certificate in certificate chain"),
    ("otherhost", "certificate verify failed: Hostname mismatch"),
])
def test_source_refuses_a_destination_it_cannot_verify(run: Runner, pki: Pki, case: str,
                                                       says: str) -> None:
    server_tls = TlsConfig(ca=pki.ca, cert=pki.otherhost if case == "otherhost" else pki.server)
    client_tls = TlsConfig(ca=pki.other_ca if case == "untrusted" else pki.ca)

    async def main() -> None:
        server, client = await tls_pair(server_tls, client_tls)
        close_all(server)  # the server may or may not have seen the alert in time
        assert isinstance(client, ChannelError), client
        assert "TLS handshake with 127.0.0.1:" in str(client)
        assert says in str(client)
        assert isinstance(client.__cause__, ssl.SSLCertVerificationError)
    run(main())


def test_handshake_with_a_silent_peer_times_out(run: Runner, pki: Pki) -> None:
    async def main() -> None:
        server, client = await socket_pair()
        try:
            with pytest.raises(ChannelError, match="TLS handshake .* timed out after 0.2 s"):
                await tls_client(client, TlsConfig(ca=pki.ca), "localhost", timeout_s=0.2)
            assert client.fileno() == -1  # taken over and closed
        finally:
            close_all(server, client)
    run(main())


def test_handshake_with_a_peer_that_hangs_up(run: Runner, pki: Pki) -> None:
    async def main() -> None:
        server, client = await socket_pair()
        client.close()
        with pytest.raises(ChannelError, match="TLS handshake"):
            await tls_server(server, TlsConfig(ca=pki.ca, cert=pki.server), timeout_s=STEP_S)
    run(main())


def test_sends_fail_cleanly_after_the_peer_is_gone(run: Runner, pki: Pki) -> None:
    async def main() -> None:
        server, client = await tls_pair(TlsConfig(ca=pki.ca, cert=pki.server),
                                        TlsConfig(ca=pki.ca))
        assert isinstance(server, ssl.SSLSocket) and isinstance(client, ssl.SSLSocket)
        server.close()
        try:
            async with asyncio.timeout(STEP_S):
                with pytest.raises(ConnectionError):
                    for _ in range(64):  # the first sends may still fit the buffers
                        await fdio.send_all(client, [bytes(MiB)])
        finally:
            client.close()
    run(main())

