"""The test kit's warm pair: repeated verified migrations between two warm machines, both
directions, and nothing left running after it closes."""

from __future__ import annotations

from devstate.config.params import MigrationParams, Routing
from devstate.config.spec import parse_spec
from tests.conftest import our_children
from tests.kit import Pair

MACHINE = parse_spec({"seed": 5, "vcpus": {"count": 16},
                      "devices": [{"name": "nic0", "size": "2MiB"}]})


def test_a_pair_migrates_back_and_forth_verified_and_closes_clean() -> None:
    before = {p.pid for p in our_children()}
    pair = Pair(MACHINE, MigrationParams(workers=2)).start()
    try:
        first = pair.source
        for n in range(4):
            sender, receiver = pair.source, pair.destination
            pair.tune(routing=Routing.SPREAD if n % 2 else Routing.AFFINITY)
            report = pair.migrate()
            assert report.verified and len(report.devices) == 17
            assert pair.source is receiver and pair.destination is sender
            assert receiver.running and not sender.running
        assert pair.migrations == 4 and pair.source is first
    finally:
        pair.close()
    assert {p.pid for p in our_children()} <= before
