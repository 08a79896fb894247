"""Main-channel messages: every type round-trips through its bytes, and a decode names the
field that is missing or of the wrong type."""

from __future__ import annotations

import dataclasses

import pytest

from devstate.errors import ProtocolError
from devstate.protocol import wire
from devstate.protocol.control import (
    MESSAGES,
    Abort,
    Commit,
    Control,
    Failed,
    Heartbeat,
    Loaded,
    MigrationHello,
    Ready,
    Report,
    Resumed,
    decode,
    decode_as,
)

EXAMPLES: list[Control] = [
    MigrationHello("5b0c6a0e-0000-4000-8000-000000000001", [["cpu/0", "record", "sim-vcpu",
                                                              1, 4096]],
                   4, "spread", True, False, 1 << 20),
    MigrationHello("5b0c6a0e-0000-4000-8000-000000000002", [], 1, "affinity", False, True,
                   4096, peer_timeout_s=7.5),
    Ready(), Ready("0d1e-boot/4026531834"), Heartbeat(), Loaded(516), Commit(), Resumed(),
    Failed("device model died"), Failed("resume failed", running=False),
    Abort("cancelled"),
    Report([{"index": 0, "id": "cpu/0"}], 123, {"workers": 2}, {"cpu/0": "ab"},
           {"engine": "native", "threads": 2, "vms": 1, "state_ns": 5, "verify_ns": 0}),
]


def _through_the_wire(message: Control) -> Control:
    data = wire.pack_control(message.kind, message.body())
    kind, length, checksum = wire.decode_control_header(data[:wire.CONTROL_HEADER_BYTES])
    return decode(kind, wire.decode_control_body(data[wire.CONTROL_HEADER_BYTES:], checksum))


def test_every_control_type_has_a_message() -> None:
    assert set(MESSAGES) == set(wire.ControlType)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_a_message_round_trips_through_its_bytes(message: Control) -> None:
    assert _through_the_wire(message) == message


def test_an_optional_field_is_left_out_when_none() -> None:
    assert Failed("x").body() == {"reason": "x"}
    assert Failed("x", running=False).body() == {"reason": "x", "running": False}


@pytest.mark.parametrize("cls", [MigrationHello, Loaded, Failed, Abort, Report])
def test_decode_names_a_missing_or_mistyped_field(cls: type[Control]) -> None:
    example = next(m for m in EXAMPLES if type(m) is cls)
    body = example.body()
    for f in dataclasses.fields(example):  # type: ignore[arg-type]
        if f.name not in body:
            continue
        missing = {k: v for k, v in body.items() if k != f.name}
        with pytest.raises(ProtocolError, match=f"control.{f.name}"):
            decode_as(cls, missing)
        wrong = {**body, f.name: 1.5 if not isinstance(body[f.name], float) else "x"}
        with pytest.raises(ProtocolError, match=f"control.{f.name}"):
            decode_as(cls, wrong)


def test_a_boolean_is_not_an_integer_and_unknown_fields_are_ignored() -> None:
    with pytest.raises(ProtocolError, match="control.devices"):
        decode_as(Loaded, {"devices": True})
    assert decode_as(Loaded, {"devices": 3, "from_a_newer_peer": 1}) == Loaded(3)
