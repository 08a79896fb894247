"""The main channel's messages as typed values, each with its encoding and a checked decode.

A message is a frozen dataclass whose fields are its JSON body's keys, one class per
:class:`~devstate.protocol.wire.ControlType`. :func:`decode` turns a received body into the
message its type names, checking every field's presence and JSON type (a
:class:`~devstate.errors.ProtocolError` names the first wrong one); an optional field is
one whose type admits None, and is left out of the body when it is None. The framing
(header, checksum, length bound) stays :mod:`devstate.protocol.wire`'s.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from devstate.errors import ProtocolError
from devstate.protocol.wire import ControlType, JsonObject, JsonValue, field

M = TypeVar("M", bound="Control")


class Control:
    """A main-channel message; subclasses are frozen dataclasses with a ``kind``."""

    __slots__ = ()
    kind: ClassVar[ControlType]

    def body(self) -> JsonObject:
        """The JSON body: every field, less optional ones that are None."""
        out: JsonObject = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


@dataclass(frozen=True, slots=True)
class MigrationHello(Control):
    """Source -> destination: who migrates what, and how."""

    kind: ClassVar[ControlType] = ControlType.HELLO
    migration_id: str
    devices: list[list[str | int]]  # the device table: [id, shape, backend, version, size]
    channels: int
    routing: str
    concurrent: bool
    digests: bool  # send the devices' digests in REPORT (for the source to compare)
    chunk_bytes: int
    # The liveness bound the source derived (devstate.migration.liveness): the destination
    # holds the source to the same one, unless its own parameters set another.
    peer_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Ready(Control):
    """Destination -> source: the table is accepted, every channel adopted, devices ready;
    ``clock`` names the monotonic clock its times are on (devstate.migration.clock)."""

    kind: ClassVar[ControlType] = ControlType.READY
    clock: str | None = None


@dataclass(frozen=True, slots=True)
class Loaded(Control):
    """Destination -> source: every device loaded and verified (phase one)."""

    kind: ClassVar[ControlType] = ControlType.LOADED
    devices: int


@dataclass(frozen=True, slots=True)
class Commit(Control):
    """Source -> destination: the source lets go; resume there (phase two)."""

    kind: ClassVar[ControlType] = ControlType.COMMIT


@dataclass(frozen=True, slots=True)
class Resumed(Control):
    """Destination -> source: the VM runs on the destination (the end of the downtime)."""

    kind: ClassVar[ControlType] = ControlType.RESUMED


@dataclass(frozen=True, slots=True)
class Failed(Control):
    """Either way: the migration failed. ``running`` is False only when the destination,
    after COMMIT, stopped and reset every device: then the source may resume."""

    kind: ClassVar[ControlType] = ControlType.FAILED
    reason: str
    running: bool | None = None


@dataclass(frozen=True, slots=True)
class Abort(Control):
    """Source -> destination: discard what was loaded."""

    kind: ClassVar[ControlType] = ControlType.ABORT
    reason: str


@dataclass(frozen=True, slots=True)
class Report(Control):
    """Destination -> source, after RESUMED: per-device results (DeviceResult JSON), when
    READY went out on the destination's clock, its parameters, and digests if asked."""

    kind: ClassVar[ControlType] = ControlType.REPORT
    devices: list[dict[str, str | int]]  # each a DeviceResult.to_json()
    ready_ns: int
    params: dict[str, JsonValue]  # MigrationParams.to_json()
    digests: dict[str, str]  # device id -> hex digest
    kvm: dict[str, JsonValue]  # VcpuCost.to_json() of the destination ({}: no kvm vCPUs)
    guest: dict[str, JsonValue] | None = None  # GuestReport.to_json() (None: no live guest)
    resumed_ns: int = 0  # the last worker's resume (a live guest's last vCPU released), our clock


@dataclass(frozen=True, slots=True)
class Heartbeat(Control):
    """Either way, while a save or load runs: this side's coordinator and every one of its
    workers still answer (devstate.migration.liveness). Carries nothing: arriving is all."""

    kind: ClassVar[ControlType] = ControlType.HEARTBEAT


MESSAGES: dict[ControlType, type[Control]] = {
    cls.kind: cls for cls in (MigrationHello, Ready, Loaded, Commit, Resumed, Failed, Abort,
                              Report, Heartbeat)}


def decode(kind: ControlType, body: JsonObject) -> Control:
    """The message ``kind`` names, from its received ``body``."""
    return decode_as(MESSAGES[kind], body)


def decode_as(cls: type[M], body: JsonObject) -> M:
    """``body`` as a message of class ``cls``; ProtocolError names a missing or ill-typed
    field (unknown fields are ignored: a newer peer may add some). A container's own type
    is checked here; its elements by their users (DeviceResult.from_json, the device
    table compared whole)."""
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = _fields(cls)
    values: dict[str, JsonValue] = {}
    for name, expected, optional in fields:
        if optional and body.get(name) is None:
            continue
        values[name] = field(body, name, expected)
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - every field was checked above
        raise ProtocolError(f"control.{cls.kind.name}", str(exc)) from None


# Each message class's fields, worked out once: the annotations are strings, and evaluating
# them compiles each (LOADED, COMMIT and RESUMED are decoded inside the downtime).
_FIELDS: dict[type[Control], tuple[tuple[str, type, bool], ...]] = {}


def _fields(cls: type[Control]) -> tuple[tuple[str, type, bool], ...]:
    """Each field of ``cls``: its name, the JSON type it must have, and whether it may be
    left out (its type admits None)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        optional = isinstance(hint, types.UnionType)  # X | None
        if optional:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out.append((f.name, typing.get_origin(hint) or hint, optional))
    return tuple(out)
