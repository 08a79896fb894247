"""MigrationParams: one frozen value, one serialised form, and the destination gets all of it."""

from __future__ import annotations

import dataclasses
import os

import pytest

from devstate.config.params import MigrationParams, Overrun, Readback, Routing, Schedule
from devstate.config.spec import parse_spec
from devstate.errors import SpecError
from devstate.migration.local import migrate_locally

# Every field away from its default, each to a value a migration can still run with: a
# field that does not reach the destination shows as a difference below.
CPUS = tuple(sorted(os.sched_getaffinity(0)))
EVERY_FIELD = MigrationParams(
    workers=1, schedule=Schedule.SEQUENTIAL, chunk_bytes=256 << 10, chunk_slots=7,
    record_slots=100, window_bytes=128 << 10, cpus=CPUS, vcpu_threads=3,
    vcpu_readback=Readback.BEFORE_COMMIT, sharded_vms=True, channels=3,
    routing=Routing.SPREAD, window_slots=5, bandwidth_limit=4e9, cap_stop_copy=False,
    spec_order=True,
    precopy=True, precopy_timeout_s=7.5, downtime_limit_ms=60_000.0, overrun=Overrun.ABORT,
    force_switchover=True, wait_for_limit=True, auto_converge=True, peer_timeout_s=45.0,
    fault="resume:kill-worker:1000000")


def test_every_field_differs_from_its_default() -> None:
    default = MigrationParams()
    same = [f.name for f in dataclasses.fields(MigrationParams)
            if getattr(EVERY_FIELD, f.name) == getattr(default, f.name)]
    assert same == [], "give these fields a value of their own in EVERY_FIELD"


def test_the_json_form_reads_back_equal() -> None:
    for params in (MigrationParams(), EVERY_FIELD):
        assert MigrationParams.from_json(params.to_json()) == params


@pytest.mark.parametrize(("data", "field"), [
    ({"workers": "2"}, "params.workers"),
    ({"workers": True}, "params.workers"),
    ({"workers": 0}, "params.workers"),
    ({"routing": "sideways"}, "params.routing"),
    ({"cpus": [0, "1"]}, "params.cpus[1]"),
    ({"bandwidth_limit": float("inf")}, "params.bandwidth_limit"),
    ({"chunk_size": 4096}, "params.chunk_size"),
    ({"chunk_bytes": 4095}, "params.chunk_bytes"),  # less than a page of guest RAM
    ([1, 2], "params"),
])
def test_bad_json_names_the_field(data: object, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        MigrationParams.from_json(data)
    assert caught.value.path == field


def test_a_change_is_a_new_value() -> None:
    params = MigrationParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.workers = 3  # type: ignore[misc]
    assert dataclasses.replace(params, workers=3).workers == 3 and params.workers == 2


def test_the_destination_gets_every_parameter_the_source_decided(run) -> None:  # type: ignore[no-untyped-def]
    """A local migration's destination (its own process) runs with exactly the source's
    parameters, its CPUs in the reverse order (so first workers do not share a core), and
    says so in its report."""
    spec = parse_spec({"vcpus": {"count": 8},
                       "devices": [{"name": "nic0", "size": "2MiB", "precopy": True}]})
    report = run(migrate_locally(spec, EVERY_FIELD))
    assert report.verified
    expected = dataclasses.replace(EVERY_FIELD, cpus=tuple(reversed(CPUS)))
    assert MigrationParams.from_json(report.destination_params) == expected
