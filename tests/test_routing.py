"""Channels decoupled from workers: any channel count over any two worker counts, affinity
and spread routing, reassembly with an arena smaller than one device, a bandwidth limit."""

from __future__ import annotations

from typing import Any

import pytest

from devstate.config.params import MigrationParams, Routing
from devstate.config.spec import MachineConfig, parse_spec
from devstate.devices import device_table
from devstate.migration.local import destination, migrate_locally
from devstate.migration.source import SourceVM
from devstate.net.route import Routes
from devstate.net.transport import parse_uri
from devstate.worker.layout import CHUNK_CLASS, arena_layout
from tests.faulty_proxy import ChannelTally, faulty_proxy
from tests.kit import Pair


def _machine(*devices: dict[str, Any], vcpus: int = 16) -> MachineConfig:
    return parse_spec({"seed": 11, "vcpus": {"count": vcpus}, "devices": list(devices)})


# The module's warm pair (tests/kit.py): two machines that pass a VM back and forth.
PAIR_SPEC = _machine({"name": "big", "size": "8MiB"}, vcpus=8)
PAIR_PARAMS = MigrationParams(workers=2)


def test_routes_give_every_channel_one_owner_per_side() -> None:
    routes = Routes(channels=5, workers=2, routing=Routing.SPREAD)
    assert [routes.channel_owner(k) for k in range(5)] == [0, 1, 0, 1, 0]
    assert routes.channels_of(0) == (0, 2, 4) and routes.channels_of(1) == (1, 3)
    # A stream of worker 1 starts on its home channel and then takes every channel in turn.
    assert [routes.channel(1, seq) for seq in range(6)] == [1, 2, 3, 4, 0, 1]
    affinity = Routes(channels=2, workers=3)
    assert affinity.channels_of(2) == ()  # fewer channels than workers: worker 2 hands off
    assert {affinity.channel(2, seq) for seq in range(4)} == {0}


@pytest.mark.parametrize(("source", "dest", "channels", "routing"), [
    (2, 3, None, Routing.AFFINITY),   # more destination workers: handoffs there
    (3, 1, None, Routing.AFFINITY),   # one destination worker receives three channels
    (2, 2, 4, Routing.SPREAD),        # one stream over four channels, two per worker
    (1, 2, 3, Routing.SPREAD),        # one source worker sends on three channels
    (3, 2, 1, Routing.SPREAD),        # fewer channels than source workers: handoffs there
])
def test_any_channel_count_over_any_worker_counts_round_trips(run, source, dest, channels,
                                                             routing) -> None:
    spec = _machine({"name": "big", "size": "24MiB"}, {"name": "small", "size": "3MiB"})
    report = run(migrate_locally(
        spec, MigrationParams(workers=source, channels=channels, routing=routing),
        dest_params=MigrationParams(workers=dest)))
    assert report.verified and all(d.verified for d in report.devices)
    assert {d.dest_worker for d in report.devices} == set(range(dest))
    # cpu/N is vCPU id N on both sides, whoever owns it.
    assert sorted(d.id for d in report.devices if d.id.startswith("cpu/")) == sorted(
        f"cpu/{i}" for i in range(16))


def test_spread_reassembles_a_stream_larger_than_the_whole_arena(run) -> None:
    """Four 256 KiB chunk slots per worker on both sides carry a 48 MiB stream spread
    over four channels: reassembly holds early packets in those slots and never stalls."""
    small = MigrationParams(workers=2, channels=4, routing=Routing.SPREAD, chunk_bytes=256 << 10,
                     chunk_slots=4)
    spec = _machine({"name": "huge", "size": "48MiB"}, vcpus=4)
    layout = arena_layout(small, device_table(spec))
    chunk_memory = layout.classes[CHUNK_CLASS].bytes * layout.workers
    assert chunk_memory * 8 <= 48 << 20
    report = run(migrate_locally(spec, small, dest_params=MigrationParams(
        workers=2, chunk_bytes=256 << 10, chunk_slots=4)))
    assert report.verified


@pytest.mark.slow  # a migration held to a bandwidth limit
def test_bandwidth_limit_holds_over_all_channels(run) -> None:
    """A lower bound only (a loaded host can always be slower): 12 MiB at 8 MiB/s over
    two channels cannot take less than its bytes, less one burst per channel, allow."""
    limit = 8 << 20
    spec = _machine({"name": "nic", "size": "12MiB"}, vcpus=2)
    report = run(migrate_locally(spec, MigrationParams(workers=2, routing=Routing.SPREAD,
                                                bandwidth_limit=limit)))
    assert report.verified
    moved = sum(d.bytes for d in report.devices)
    bursts = 2 * (1 << 20)
    assert report.downtime_ms / 1e3 >= (moved - bursts) / limit


def test_reports_give_each_device_its_channel_and_timeline(warm_pair: Pair) -> None:
    for routing, stream_channel in ((Routing.AFFINITY, None), (Routing.SPREAD, -1)):
        warm_pair.tune(channels=2, routing=routing)
        report = warm_pair.migrate()
        assert report.verified
        rows = {d.id: d for d in report.devices}
        big = rows["vfio/big"]
        if stream_channel is None:  # its home channel: its source worker's
            assert big.channel == big.source_worker
        else:
            assert big.channel == stream_channel
        assert {rows[f"cpu/{i}"].channel for i in range(8)} <= {0, 1}
        for d in report.devices:  # get, transfer and put, complete: in that order
            assert d.save_start_ms <= d.save_end_ms
            assert d.load_start_ms <= d.load_end_ms <= d.load_done_ms


def test_spread_sends_each_stream_packet_on_its_own_channel(run) -> None:
    """Seen on the wire by a proxy that parses every data channel: with spread routing a
    stream's packet ``seq`` rides channel ``(home + seq) % N``, each exactly once, so
    one stream uses every channel (affinity order would put them all on its home)."""
    spec = _machine({"name": "big", "size": "8MiB"}, vcpus=4)
    table = device_table(spec)
    big = next(d.index for d in table if d.id == "vfio/big")
    params = MigrationParams(workers=2, channels=3, routing=Routing.SPREAD)

    async def scenario() -> tuple[dict[int, ChannelTally], int]:
        async with SourceVM(spec, params) as source, destination(
                spec, MigrationParams(workers=2), incoming="tcp:127.0.0.1:0") as dest:
            async with faulty_proxy((dest.address.host, dest.address.port), {},
                                    count_packets=len(table)) as proxy:
                report = await source.migrate(parse_uri(proxy.uri), compare_digests=True)
            assert report.verified
            return proxy.data, source.outgoing.routes.home(source.plan.owner[big])

    data, home = run(scenario())
    on = {k: tally.streams.get(big, []) for k, tally in data.items()}
    seqs = sorted(s for carried in on.values() for s in carried)
    assert len(seqs) >= 6 and seqs == list(range(len(seqs)))  # each once, END included
    for k, carried in on.items():
        assert all((home + s) % 3 == k for s in carried), (k, carried)
    assert all(on.get(k) for k in range(3)), on
