"""Migrations over each transport (Unix, TCP, mutual TLS) with four data channels, and the
setup and transfer failures that must tear everything down: no hang, no leaked process,
thread, fd or shared-memory segment, an error naming the channel and cause, and a source
VM that keeps running with its state unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest

from devstate.config.params import MigrationParams, Routing
from devstate.config.spec import parse_spec
from devstate.errors import MigrationFailed
from devstate.migration.local import destination
from devstate.migration.source import SourceVM
from devstate.net.tls import TlsConfig
from devstate.net.transport import parse_uri
from devstate.protocol import wire
from tests.faulty_proxy import Fault, faulty_proxy
from tests.pki import Pki, make_pki

SPEC = parse_spec({"seed": 3, "vcpus": {"count": 32},
                   "devices": [{"name": "big", "size": "32MiB"},
                               {"name": "small", "size": "4MiB"}]})


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


async def _migrate(uri: str | None, routing: Routing, tls: Pki | None) -> Any:
    params = MigrationParams(workers=2, channels=4, routing=routing)
    async with SourceVM(SPEC, params) as source, destination(
            SPEC, MigrationParams(workers=2), incoming=uri,
            tls=tls.server if tls else None) as dest:
        return await source.migrate(dest.address, tls=tls.client if tls else None,
                                    compare_digests=True)


@pytest.mark.parametrize(("uri", "routing", "secure"), [
    (None, Routing.AFFINITY, False),
    ("tcp:127.0.0.1:0", Routing.SPREAD, False),
    ("tcp:127.0.0.1:0", Routing.SPREAD, True),
], ids=["unix-affinity", "tcp-spread", "mutual-tls-spread"])
def test_four_channels_migrate_bit_exact(run, pki, no_fd_or_thread_leaks, uri, routing,
                                         secure) -> None:
    report = run(_migrate(uri, routing, pki if secure else None))
    assert report.verified and all(d.verified for d in report.devices)


async def _fail_through_proxy(faults: dict[tuple[wire.ChannelKind, int], Fault],
                              tls: TlsConfig | None, server: TlsConfig | None,
                              cut_after: int = 4 << 20) -> tuple[MigrationFailed, bool, bool]:
    params = MigrationParams(workers=2, channels=4, routing=Routing.SPREAD)
    async with SourceVM(SPEC, params) as source, destination(
            SPEC, MigrationParams(workers=2), incoming="tcp:127.0.0.1:0", tls=server) as dest:
        before = await source.digests()
        fds = _worker_fds(source)
        async with faulty_proxy((dest.address.host, dest.address.port), faults,
                                cut_after) as proxy:
            with pytest.raises(MigrationFailed) as info:
                await source.migrate(parse_uri(proxy.uri), tls=tls)
        assert _worker_fds(source) == fds, "a source worker kept fds of the failed migration"
        return info.value, source.running, await source.digests() == before


def _worker_fds(source: SourceVM) -> dict[int, int]:
    return {pid: psutil.Process(pid).num_fds() for pid in source.pool.pids}


def test_refused_connection_names_the_address(run, no_fd_or_thread_leaks) -> None:
    async def scenario() -> tuple[str, bool]:
        async with SourceVM(SPEC, MigrationParams(workers=2, channels=4)) as source:
            # A port nobody listens on: bound, never listening, so nothing can take it.
            import socket
            with socket.socket() as parked:
                parked.bind(("127.0.0.1", 0))
                port = parked.getsockname()[1]
                with pytest.raises(MigrationFailed) as info:
                    await source.migrate(parse_uri(f"tcp:127.0.0.1:{port}"))
            return str(info.value), source.running

    error, running = run(scenario())
    assert "main channel" in error and "cannot connect to tcp:127.0.0.1:" in error
    assert "refused" in error.lower()
    assert running


def test_tls_handshake_failure_on_one_data_channel(run, pki, no_fd_or_thread_leaks) -> None:
    error, running, unchanged = run(_fail_through_proxy(
        {(wire.ChannelKind.DATA, 2): Fault.GARBAGE}, pki.client, pki.server))
    assert "data channel 2" in str(error) and "TLS handshake" in str(error)
    assert running and unchanged


def test_a_refused_data_channel_names_its_index(run, no_fd_or_thread_leaks) -> None:
    error, running, unchanged = run(_fail_through_proxy(
        {(wire.ChannelKind.DATA, 3): Fault.REFUSE}, None, None))
    assert "data channel 3" in str(error) or "channel 3" in str(error)
    assert running and unchanged


def test_peer_closing_mid_migration(run, pki, no_fd_or_thread_leaks) -> None:
    error, running, unchanged = run(_fail_through_proxy(
        {(wire.ChannelKind.DATA, 1): Fault.CUT}, pki.client, pki.server, cut_after=2 << 20))
    assert "source resumed" in str(error)
    assert "channel 1" in str(error) or "closed" in str(error)
    assert running and unchanged


def test_source_that_does_not_trust_the_destination(run, pki, no_fd_or_thread_leaks) -> None:
    async def scenario() -> tuple[str, bool]:
        async with SourceVM(SPEC, MigrationParams(workers=2, channels=4)) as source, destination(
                SPEC, MigrationParams(workers=2), incoming="tcp:127.0.0.1:0",
                tls=pki.server) as dest:
            with pytest.raises(MigrationFailed) as info:
                await source.migrate(dest.address, tls=pki.untrusting)
            return str(info.value), source.running

    error, running = run(scenario())
    assert "main channel" in error and "TLS handshake" in error
    assert "certificate verify failed" in error
    assert running


def test_destination_refuses_a_source_without_a_client_certificate(
        run, pki, no_fd_or_thread_leaks) -> None:
    anonymous = TlsConfig(ca=pki.client.ca)

    async def scenario() -> tuple[str, bool]:
        async with SourceVM(SPEC, MigrationParams(workers=2)) as source, destination(
                SPEC, MigrationParams(workers=2), incoming="tcp:127.0.0.1:0",
                tls=pki.server) as dest:
            with pytest.raises(MigrationFailed) as info:
                await source.migrate(dest.address, tls=anonymous)
            return str(info.value), source.running

    error, running = run(scenario())
    assert "certificate required" in error or "TLS" in error
    assert running


def test_a_destination_that_requires_tls_refuses_plain_tcp(
        run, pki, no_fd_or_thread_leaks, capfd) -> None:
    """A source that speaks plaintext to a TLS destination gets no channel: the destination
    refuses at the hello (no handshake timeout), says why, and the source resumes
    unchanged."""
    async def scenario() -> tuple[str, bool, bool, int | None]:
        async with SourceVM(SPEC, MigrationParams(workers=2)) as source, destination(
                SPEC, MigrationParams(workers=2), incoming="tcp:127.0.0.1:0",
                tls=pki.server) as dest:
            before = await source.digests()
            with pytest.raises(MigrationFailed) as info:
                await source.migrate(dest.address)
            unchanged = await source.digests() == before
        return str(info.value), source.running, unchanged, dest.returncode

    error, running, unchanged, dest_code = run(scenario())
    assert "main channel" in error and "closed by the destination" in error
    assert running and unchanged and dest_code != 0
    assert "requires TLS; the source offered plaintext" in capfd.readouterr().err


def test_stray_duplicate_and_late_connections_are_refused_and_logged(
        no_fd_or_thread_leaks, run, capfd) -> None:
    """Bytes that are no hello, another migration's hello, a second data channel 1 and a
    connection during the transfer: each refused and logged by the destination, and the
    migration completes verified."""
    big = parse_spec({"seed": 4, "vcpus": {"count": 8},
                      "devices": [{"name": "big", "size": "160MiB"}]})

    async def scenario() -> Any:
        async with SourceVM(big, MigrationParams(workers=2, channels=4)) as source, destination(
                big, MigrationParams(workers=2), incoming="tcp:127.0.0.1:0") as dest:
            upstream = (dest.address.host, dest.address.port)
            async with faulty_proxy(upstream, {}, intrude=True) as proxy:
                return await source.migrate(parse_uri(proxy.uri), compare_digests=True)

    report = run(scenario())
    assert report.verified
    log = capfd.readouterr().err
    assert "refused a connection: hello.magic" in log
    assert "refused a data channel: migration id" in log
    assert "channel 1 is already connected" in log
    assert "refused a late connection" in log


def test_a_source_migrates_again_after_a_transfer_failed(run, no_fd_or_thread_leaks) -> None:
    """A channel cut mid-transfer fails the first migration; the same source (its pool,
    arena and slots reused) then migrates to a fresh destination, verified: nothing the
    failed run held is missing from the next."""
    async def scenario() -> Any:
        params = MigrationParams(workers=2, channels=4, routing=Routing.SPREAD, chunk_slots=4)
        async with SourceVM(SPEC, params) as source:
            for attempt in range(2):
                async with destination(SPEC, MigrationParams(workers=2),
                                       incoming="tcp:127.0.0.1:0") as dest:
                    if attempt == 0:
                        upstream = (dest.address.host, dest.address.port)
                        async with faulty_proxy(upstream, {(wire.ChannelKind.DATA, 1):
                                                           Fault.CUT}, 2 << 20) as proxy:
                            with pytest.raises(MigrationFailed):
                                await source.migrate(parse_uri(proxy.uri))
                    else:
                        return await source.migrate(dest.address, compare_digests=True)
        return None

    report = run(scenario())
    assert report.verified
