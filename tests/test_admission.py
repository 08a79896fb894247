"""Stop-and-copy admits streams in the plan's transfer order: the longest tail (firmware,
and what loads after) moves first, within what the host copies at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from devstate.config.params import MigrationParams
from devstate.config.spec import parse_spec
from devstate.devices import device_table
from devstate.migration.deadline import Deadline
from devstate.migration.local import destination
from devstate.migration.machine import Machine
from devstate.migration.source import SourceVM
from devstate.planning.admission import Admission, TransferOrder
from devstate.planning.cost import HostCosts, estimate
from devstate.planning.plan import make_plan, spec_order_plan, tail_s
from tests.kvm_access import needs_kvm

# Listed short tail first (as a VMM's bus order might have it): a small device with 10 ms
# of firmware, then a big one with 300 ms, and vCPUs that load after the small one.
TAILS: dict[str, Any] = {
    "seed": 5, "vcpus": {"count": 8, "after": ["vfio/small"]},
    "devices": [{"name": "small", "size": "8MiB", "firmware_latency_ms": 10},
                {"name": "big", "size": "48MiB", "firmware_latency_ms": 300}]}


def test_the_gate_holds_a_stream_while_those_ahead_fill_the_budget(run) -> None:
    async def scenario() -> list[str]:
        # Streams 10, 11, 12 at 1, 1, 3 units; the budget is 1.5: stream 11 may join
        # stream 10 (1 < 1.5 ahead), stream 12 waits until only one unit is ahead.
        gate = Admission(TransferOrder(((10, 1.0), (11, 1.0), (12, 3.0)), budget=1.5))
        assert gate.may_start(10) and gate.may_start(11) and not gate.may_start(12)
        assert gate.may_start(99)  # a stream outside the order is never held
        seen: list[str] = []

        async def stream(index: int) -> None:
            await gate.turn(index)
            seen.append(f"start {index}")

        waiting = asyncio.ensure_future(stream(12))
        await asyncio.sleep(0.01)
        assert seen == []
        gate.finished(11)
        await asyncio.sleep(0.01)
        assert seen == ["start 12"]  # 1 unit ahead now: within the budget
        await waiting
        return seen

    assert run(scenario()) == ["start 12"]


def test_ram_ranges_move_together_and_hold_the_streams_behind_as_one(run) -> None:
    """A guest's RAM ranges are pieces of one stream: each at a rate above the budget,
    they would move one at a time as devices do; they never wait for each other, and a
    stream behind them waits for the last of them."""
    async def scenario() -> None:
        # A device (10), three RAM ranges (20-22) and a device behind them (30), every one
        # at 2 units against a budget of 1.5: as devices, each would wait for the one ahead.
        gate = Admission(TransferOrder(((10, 2.0), (20, 2.0), (21, 2.0), (22, 2.0),
                                        (30, 2.0)), budget=1.5,
                                       ram=frozenset({20, 21, 22})))
        assert [gate.may_start(i) for i in (10, 20, 21, 22, 30)] == [True] + [False] * 4
        gate.finished(10)
        assert [gate.may_start(i) for i in (20, 21, 22, 30)] == [True, True, True, False]
        behind = asyncio.ensure_future(gate.turn(30))
        for index in (20, 22):
            gate.finished(index)
            await asyncio.sleep(0.01)
            assert not behind.done()  # range 21 still moves
        gate.finished(21)
        await asyncio.wait_for(behind, 1.0)

    run(scenario())


@needs_kvm
def test_the_deadlines_transfer_order_names_the_guests_ram_ranges() -> None:
    """What the workers' gates are given: the RAM ranges marked as pieces of one stream,
    the VFIO devices not (a machine built, not started: no process runs)."""
    spec = parse_spec({**TAILS, "vcpus": {"count": 2, "backend": "kvm"},
                       "ram": {"size": "96MiB"}})
    order = Deadline(Machine(spec, MigrationParams(workers=2))).transfer_order(HostCosts())
    ids = {d.index: d.id for d in device_table(spec)}
    assert sorted(ids[i] for i in order.ram) == ["ram/0", "ram/1", "ram/2"]
    assert {ids[i] for i, _ in order.streams} == {"ram/0", "ram/1", "ram/2", "vfio/small",
                                                  "vfio/big"}


def test_the_plan_moves_the_longest_tail_first_and_spec_order_its_table() -> None:
    spec = parse_spec(TAILS)
    by_id = {d.id: d.index for d in device_table(spec)}
    tails = tail_s(device_table(spec), 2)
    # small: its 10 ms firmware, then 8 vCPU puts (45 µs each) over 2 workers.
    assert tails[by_id["vfio/small"]] == 0.010 + 8 * 45e-6 / 2
    table = device_table(spec)
    assert make_plan(table, 2).transfer == (by_id["vfio/big"], by_id["vfio/small"])
    assert spec_order_plan(table, 2).transfer == (by_id["vfio/small"], by_id["vfio/big"])


def test_the_estimate_follows_the_transfer_order() -> None:
    """One stream at a time: in spec order the big device's 300 ms of firmware start
    after both devices' bytes; in the plan's order, after its own."""
    spec = parse_spec(TAILS)
    host = HostCosts(copy_bytes_per_s=56 * 2**20 / 0.2)  # 200 ms for both devices' bytes
    ordered = estimate(device_table(spec), spec_order_plan(device_table(spec), 2), host).host_parts
    planned = estimate(device_table(spec), make_plan(device_table(spec), 2), host).host_parts
    assert ordered[0] == 200.0 and ordered[4] == 300  # through big: 56 MiB, then 300 ms
    assert planned[0] == 48 / 56 * 200 and planned[4] == 300  # through big: its 48 MiB


def _ends(spec_order: bool, run) -> dict[str, float]:
    """Each stream's last byte read (ms after the stop), with the host's copy rate set
    below one stream's so that every stream moves alone."""
    params = MigrationParams(spec_order=spec_order)

    async def scenario() -> dict[str, float]:
        async with SourceVM(parse_spec(TAILS), params) as source, \
                destination(parse_spec(TAILS), params) as dest:
            report = await source.migrate(dest.address, compare_digests=True,
                                          costs=HostCosts(copy_bytes_per_s=2**20))
            assert report.verified
            return {d.id: d.save_end_ms for d in report.devices if d.id.startswith("vfio/")}

    return run(scenario())


@pytest.mark.slow  # two migrations at a low host rate
def test_streams_move_in_the_plans_order_in_a_migration(run) -> None:
    """Together, the small device's 8 MiB would be read long before the big one's 48 MiB;
    admitted one at a time, the big one (the longest tail) is read first with the plan,
    the small one first in spec order."""
    planned = _ends(False, run)
    assert planned["vfio/big"] < planned["vfio/small"]
    ordered = _ends(True, run)
    assert ordered["vfio/small"] < ordered["vfio/big"]
