"""The liveness rule against a frozen link: both coordinators and all their workers run,
but nothing moves between them.

Every channel of the migration (main and data) goes through a proxy that, once
stop-and-copy starts, stops forwarding in both directions and closes nothing: no process
is stopped, no connection reset, and every send backs up against full socket buffers. Only
the silence on the main channel can tell; the source must give up after its peer timeout
and resume. Outcomes are checked, never timings (a ceiling only catches a hang).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from devstate.errors import MigrationFailed
from devstate.migration.local import destination
from devstate.migration.source import SourceVM
from devstate.net.transport import parse_uri
from devstate.phase import Phase
from devstate.protocol import wire
from tests.faulty_proxy import faulty_proxy
from tests.test_liveness import CEILING_S, PARAMS, PEER_TIMEOUT_S, SLOW, afterwards

pytestmark = pytest.mark.slow

# The liveness tests' machine (stop-and-copy lasts over a second, so a freeze at the start
# of DEVICE lands in it), bound and ceiling.


async def _over_a_link_that_freezes() -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    async with SourceVM(SLOW, PARAMS) as source:
        before = await source.digests()
        async with destination(SLOW, PARAMS, incoming="tcp:127.0.0.1:0") as dest, \
                faulty_proxy((dest.address.host, dest.address.port), {}) as proxy:

            def on_status(status: Phase) -> None:
                if status is Phase.DEVICE:
                    proxy.freeze()

            try:
                async with asyncio.timeout(CEILING_S):
                    await source.migrate(parse_uri(proxy.uri), on_status=on_status)
            except MigrationFailed as exc:
                outcome["error"] = str(exc)
            outcome["frozen"] = proxy.frozen
            outcome["channels"] = {kind for kind, _ in proxy.seen}
        outcome.update(await afterwards(source, before))
    return outcome


def test_a_link_frozen_at_the_stop_is_given_up_and_the_source_resumes(run) -> None:
    outcome = run(_over_a_link_that_freezes())
    # Every channel went through the proxy, and it froze during stop-and-copy.
    assert outcome["channels"] == {wire.ChannelKind.MAIN, wire.ChannelKind.DATA}
    assert outcome["frozen"]
    error = outcome.get("error", "")
    assert "peer timeout" in error and f"{PEER_TIMEOUT_S:.1f} s" in error, error
    assert "source resumed" in error, error
    assert outcome["running"] and outcome["unchanged"]
    assert outcome["remigrated"]
