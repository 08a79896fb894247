"""The VFIO migration uAPI v2 as data, and the control messages of the ``vfio-sim`` backend.

Runs in: anywhere. Pure: no I/O, so it can be tested exhaustively. The device model
(:mod:`devstate.devices.vfio.model`) executes transitions with it; the client
(:mod:`devstate.devices.vfio.sim`) and the tests read it.

Part 1 follows ``include/uapi/linux/vfio.h`` and ``vfio_mig_get_next_state()`` in
``drivers/vfio/vfio_main.c`` (shared/reference/vfio-migration-v2.md): the states, the
feature flags, the arcs a driver implements, and the rule for every other ``(cur, new)``
request: the shortest path over the arcs the device supports that enters or leaves the
saving group only at its ends. The kernel precomputes that rule as a table and skips
unsupported optional states while walking it; here the arcs are the data and the path is
searched, and ``tests/test_vfio_uapi.py`` checks both give the same path for every request.

Part 2 is the simulator's stand-in for the ioctls: fixed-size messages exchanged over a
``SOCK_SEQPACKET`` socket between the client and its device-model process.
"""

from __future__ import annotations

import enum
import errno
import functools
import json
import struct
from collections import deque
from dataclasses import asdict, dataclass

# --------------------------------------------------------------------------- part 1: uAPI


class VfioState(enum.IntEnum):
    """``enum vfio_device_mig_state``; the values are the kernel's."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigrationFlags(enum.IntFlag):
    """``VFIO_DEVICE_FEATURE_MIGRATION`` flags: the optional parts of the FSM a device has."""

    STOP_COPY = 1 << 0  # mandatory: STOP, STOP_COPY, RESUMING (RUNNING and ERROR always exist)
    P2P = 1 << 1  # RUNNING_P2P, and PRE_COPY_P2P together with PRE_COPY
    PRE_COPY = 1 << 2  # PRE_COPY


class Session(enum.Enum):
    """What an arc does to the data session (the data fd)."""

    NONE = "none"  # no session involved
    OPEN_SAVE = "open-save"  # a new save session: SET_STATE returns a new data fd
    OPEN_RESUME = "open-resume"  # a new resume session: SET_STATE returns a new data fd
    KEEP = "keep"  # moves inside the saving group: same fd, only what is streamed changes
    END_SAVE = "end-save"  # leaves the saving group: the save fd is finished
    END_RESUME = "end-resume"  # the device validates and incorporates what was written

    @property
    def opens(self) -> bool:
        """True if the arc returns a new data fd."""
        return self in (Session.OPEN_SAVE, Session.OPEN_RESUME)

    @property
    def ends(self) -> bool:
        """True if the arc finishes the current data fd's session."""
        return self in (Session.END_SAVE, Session.END_RESUME)


_S = VfioState
_F = MigrationFlags
_NO_FLAGS = MigrationFlags(0)

# The states that stream a save session and share its fd. A combination transition may
# start or end in one, and move inside the group, but never enters or leaves it midway:
# that would open or end a session nobody asked for.
SAVING_GROUP = frozenset({_S.PRE_COPY, _S.PRE_COPY_P2P, _S.STOP_COPY})
PRECOPY_STATES = frozenset({_S.PRE_COPY, _S.PRE_COPY_P2P})

# The features a device needs for a state to exist (the kernel's state_flags_table).
# ERROR is absent on purpose: it is never requestable.
STATE_NEEDS: dict[VfioState, MigrationFlags] = {
    _S.STOP: _F.STOP_COPY,
    _S.RUNNING: _F.STOP_COPY,
    _S.STOP_COPY: _F.STOP_COPY,
    _S.RESUMING: _F.STOP_COPY,
    _S.RUNNING_P2P: _F.STOP_COPY | _F.P2P,
    _S.PRE_COPY: _F.STOP_COPY | _F.PRE_COPY,
    _S.PRE_COPY_P2P: _F.STOP_COPY | _F.P2P | _F.PRE_COPY,
}


@dataclass(frozen=True, slots=True)
class Arc:
    """One FSM arc a driver implements, and what it does to the data session.

    The arc exists when the device has every feature in ``needs`` and none in ``unless``:
    ``unless`` marks the shortcuts a driver implements in place of an optional state it
    lacks (without P2P, RUNNING -> STOP is one arc instead of going via RUNNING_P2P).
    """

    src: VfioState
    dst: VfioState
    session: Session
    needs: MigrationFlags = MigrationFlags.STOP_COPY
    unless: MigrationFlags = _NO_FLAGS

    def exists(self, flags: MigrationFlags) -> bool:
        """True if a device with ``flags`` implements this arc."""
        return (flags & self.needs) == self.needs and not flags & self.unless


_SC_P2P = _F.STOP_COPY | _F.P2P
_SC_PRE = _F.STOP_COPY | _F.PRE_COPY
_ALL = _F.STOP_COPY | _F.P2P | _F.PRE_COPY

ARCS: tuple[Arc, ...] = (
    # -- Every device (VFIO_MIGRATION_STOP_COPY) --
    # Start saving a stopped device: new save session and fd; read to end of stream.
    Arc(_S.STOP, _S.STOP_COPY, Session.OPEN_SAVE),
    # Saving over: the save session ends; the device stays stopped with its state.
    Arc(_S.STOP_COPY, _S.STOP, Session.END_SAVE),
    # Start loading: new resume session and fd; the driver may reset internal state first.
    Arc(_S.STOP, _S.RESUMING, Session.OPEN_RESUME),
    # Loading over: validate and incorporate what was written; may fail and go to ERROR.
    Arc(_S.RESUMING, _S.STOP, Session.END_RESUME),
    # -- Without P2P: the stop and run arcs skip the absent RUNNING_P2P --
    # Stop in one step: no interrupts, no DMA, no change of internal or external state.
    Arc(_S.RUNNING, _S.STOP, Session.NONE, unless=_F.P2P),
    # Run in one step: fully operational again.
    Arc(_S.STOP, _S.RUNNING, Session.NONE, unless=_F.P2P),
    # -- VFIO_MIGRATION_P2P --
    # P2P-quiesce: initiate no new P2P DMA, finish outstanding P2P, still answer incoming.
    Arc(_S.RUNNING, _S.RUNNING_P2P, Session.NONE, needs=_SC_P2P),
    # Fully operational again.
    Arc(_S.RUNNING_P2P, _S.RUNNING, Session.NONE, needs=_SC_P2P),
    # Stop a P2P-quiescent device: no interrupts, no DMA, no state change.
    Arc(_S.RUNNING_P2P, _S.STOP, Session.NONE, needs=_SC_P2P),
    # Run again but still P2P-quiescent (first step of resuming a stopped device).
    Arc(_S.STOP, _S.RUNNING_P2P, Session.NONE, needs=_SC_P2P),
    # -- VFIO_MIGRATION_PRE_COPY --
    # Start saving while running: new save session and fd; the initial bytes stream first.
    Arc(_S.RUNNING, _S.PRE_COPY, Session.OPEN_SAVE, needs=_SC_PRE),
    # Abandon precopy: the save session ends; the device keeps running.
    Arc(_S.PRE_COPY, _S.RUNNING, Session.END_SAVE, needs=_SC_PRE),
    # Without P2P, switchover in one step: stop and stream the rest on the same fd.
    Arc(_S.PRE_COPY, _S.STOP_COPY, Session.KEEP, needs=_SC_PRE, unless=_F.P2P),
    # -- VFIO_MIGRATION_PRE_COPY with VFIO_MIGRATION_P2P --
    # P2P-quiesce while precopy keeps streaming on the same fd.
    Arc(_S.PRE_COPY, _S.PRE_COPY_P2P, Session.KEEP, needs=_ALL),
    # Leave P2P quiescence while precopy keeps streaming on the same fd.
    Arc(_S.PRE_COPY_P2P, _S.PRE_COPY, Session.KEEP, needs=_ALL),
    # Abandon precopy while P2P-quiescent: the save session ends.
    Arc(_S.PRE_COPY_P2P, _S.RUNNING_P2P, Session.END_SAVE, needs=_ALL),
    # Switchover: the device stops and streams the rest on the same fd, then end of stream.
    Arc(_S.PRE_COPY_P2P, _S.STOP_COPY, Session.KEEP, needs=_ALL),
    # Start saving while P2P-quiescent: new save session and fd; initial bytes first.
    Arc(_S.RUNNING_P2P, _S.PRE_COPY_P2P, Session.OPEN_SAVE, needs=_ALL),
)

# Requests refused although a path exists: a save that reached STOP_COPY cannot go back to
# precopy (the kernel's table maps these to ERROR; since the 2026 fix the search returns
# -EINVAL instead of looping).
BLOCKED: frozenset[tuple[VfioState, VfioState]] = frozenset({
    (_S.STOP_COPY, _S.PRE_COPY),
    (_S.STOP_COPY, _S.PRE_COPY_P2P),
})

_ARC_BY_ENDS: dict[tuple[VfioState, VfioState], Arc] = {(a.src, a.dst): a for a in ARCS}


class InvalidTransition(OSError):
    """A SET_STATE request the uAPI refuses with ``EINVAL``; the device state is unchanged."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


def is_supported(state: VfioState, flags: MigrationFlags) -> bool:
    """True if a device with ``flags`` has ``state`` (ERROR never counts: it is not requestable)."""
    needs = STATE_NEEDS.get(state)
    return needs is not None and (flags & needs) == needs


def session_effect(src: VfioState, dst: VfioState) -> Session:
    """What the direct arc ``src -> dst`` does to the data session (KeyError if no such arc)."""
    return _ARC_BY_ENDS[(src, dst)].session


def next_path(cur: VfioState, new: VfioState, flags: MigrationFlags) -> list[VfioState]:
    """The states a SET_STATE from ``cur`` to ``new`` walks, ``cur`` first and ``new`` last.

    ``[cur]`` when ``cur == new``. Raises :class:`InvalidTransition` (EINVAL) for what the
    uAPI refuses: a device in ERROR (only a reset recovers it), a request for ERROR or for a
    state the device lacks, and STOP_COPY -> PRE_COPY[_P2P].
    """
    _check_flags(flags)
    if cur is _S.ERROR:
        raise InvalidTransition("the device is in ERROR: only a reset recovers it")
    if new is _S.ERROR:
        raise InvalidTransition("ERROR cannot be requested")
    for state in (cur, new):
        if not is_supported(state, flags):
            missing = STATE_NEEDS[state] & ~flags
            raise InvalidTransition(f"{state.name} needs migration feature(s) {missing.name} "
                                    "the device does not have")
    if (cur, new) in BLOCKED:
        raise InvalidTransition(f"{cur.name} -> {new.name} is not permitted: a save in "
                                "STOP_COPY cannot go back to precopy")
    return list(_shortest_path(cur, new, flags))


def _check_flags(flags: MigrationFlags) -> None:
    if not flags & _F.STOP_COPY or flags & ~_ALL:
        raise ValueError(f"invalid migration flags {int(flags):#x}: STOP_COPY is mandatory "
                         f"and only {_ALL!r} are defined")


@functools.cache
def _shortest_path(cur: VfioState, new: VfioState,
                   flags: MigrationFlags) -> tuple[VfioState, ...]:
    """Breadth-first search over the arcs ``flags`` allows, from ``cur`` to ``new``.

    Interior states obey the saving-group rule: a path between two saving-group states
    stays inside the group (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY only changes what the one
    session streams); any other path has no saving-group state inside, so it never opens,
    re-opens or keeps a session that its caller did not ask for.
    """
    within_group = cur in SAVING_GROUP and new in SAVING_GROUP
    came_from: dict[VfioState, VfioState | None] = {cur: None}
    queue = deque([cur])
    while queue:
        state = queue.popleft()
        if state == new:
            path = [state]
            while (prev := came_from[path[-1]]) is not None:
                path.append(prev)
            return tuple(reversed(path))
        if state != cur and (state in SAVING_GROUP) != within_group:
            continue  # may end the path here but not pass through
        for arc in _arcs_from(state, flags):
            if arc.dst not in came_from:
                came_from[arc.dst] = state
                queue.append(arc.dst)
    # Not reached with the arcs above (the tests try every request); a gap in a future arc
    # table must refuse the request, not hang or crash a model.
    raise InvalidTransition(f"no path from {cur.name} to {new.name}")


@functools.cache
def _arcs_from(state: VfioState, flags: MigrationFlags) -> tuple[Arc, ...]:
    return tuple(a for a in ARCS if a.src == state and a.exists(flags))


# --------------------------------------------------------- part 2: simulator control messages


class Op(enum.IntEnum):
    """Control requests, each the stand-in for one VFIO ioctl (or a simulator extra)."""

    HELLO = 0  # model -> client, once at start (seq 0): ready, with its feature flags
    SET_STATE = 1  # VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE SET; arg = new state; may carry a fd
    GET_STATE = 2  # VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE GET
    GET_DATA_SIZE = 3  # VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: estimated stop-copy bytes
    GET_PRECOPY_INFO = 4  # VFIO_MIG_GET_PRECOPY_INFO: EINVAL outside PRE_COPY[_P2P]
    GET_DIGEST = 5  # simulator: xxh3_128 of the device state
    RESET = 6  # VFIO_DEVICE_RESET: -> RUNNING, ends any session
    QUIT = 7  # simulator: exit now; no reply


# Reply.detail is the reason of a refusal, for the error message; bounded so a reply always
# fits one datagram.
MAX_DETAIL_BYTES = 480


@dataclass(frozen=True, slots=True)
class Request:
    """Client -> model. ``seq`` pairs the reply with its request (see :class:`Reply`)."""

    seq: int
    op: Op
    arg: int = 0

    _FORMAT = struct.Struct("<III")

    def pack(self) -> bytes:
        """The request as one datagram."""
        return self._FORMAT.pack(self.seq, self.op, self.arg)

    @classmethod
    def unpack(cls, data: bytes) -> Request:
        """Parse a datagram; ValueError if malformed."""
        if len(data) != cls._FORMAT.size:
            raise ValueError(f"request of {len(data)} bytes, expected {cls._FORMAT.size}")
        seq, op, arg = cls._FORMAT.unpack(data)
        return cls(seq, Op(op), arg)


@dataclass(frozen=True, slots=True)
class Reply:
    """Model -> client: the outcome of one request, and the device's state after it.

    A caller cancelled while awaiting a reply leaves it unread; ``seq`` lets the next caller
    skip it. Each op fills the fields it answers: ``flags`` (HELLO), ``data_size``
    (GET_DATA_SIZE), ``initial_bytes``/``dirty_bytes`` (GET_PRECOPY_INFO), ``digest``
    (GET_DIGEST). ``errno`` is 0 on success; ``detail`` says why not.
    """

    seq: int
    op: int
    state: VfioState
    errno: int = 0
    flags: MigrationFlags = _NO_FLAGS
    data_size: int = 0
    initial_bytes: int = 0
    dirty_bytes: int = 0
    digest: bytes = bytes(16)
    detail: str = ""

    _FORMAT = struct.Struct("<IIIiIQQQ16s")
    MAX_BYTES = _FORMAT.size + MAX_DETAIL_BYTES

    def pack(self) -> bytes:
        """The reply as one datagram."""
        detail = self.detail.encode("utf-8", "replace")[:MAX_DETAIL_BYTES]
        return self._FORMAT.pack(self.seq, self.op, self.state, self.errno, self.flags,
                                 self.data_size, self.initial_bytes, self.dirty_bytes,
                                 self.digest) + detail

    @classmethod
    def unpack(cls, data: bytes) -> Reply:
        """Parse a datagram; ValueError if malformed."""
        if not cls._FORMAT.size <= len(data) <= cls.MAX_BYTES:
            raise ValueError(f"reply of {len(data)} bytes")
        seq, op, state, err, flags, size, initial, dirty, digest = cls._FORMAT.unpack_from(data)
        return cls(seq, op, VfioState(state), err, MigrationFlags(flags), size, initial,
                   dirty, digest, data[cls._FORMAT.size:].decode("utf-8", "replace"))


@dataclass(frozen=True, slots=True)
class PrecopyInfo:
    """``struct vfio_precopy_info``: bytes of the save stream the device has yet to produce."""

    initial_bytes: int
    dirty_bytes: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What a device-model process is started with (``--config``, as JSON)."""

    name: str
    size: int
    seed: int
    read_bandwidth: int  # bytes/s the device produces a save stream at
    write_bandwidth: int  # bytes/s the device consumes a resume stream at
    firmware_latency_ms: float  # spent on RESUMING -> STOP once the data is valid
    flags: MigrationFlags
    incoming: bool  # starts blank (all zero bytes), waiting to be loaded
    owner_pid: int  # the process that must outlive the model (PR_SET_PDEATHSIG)
    dirty_rate: int = 0  # bytes/s of state rewritten while running (PRE_COPY re-sends)

    def to_json(self) -> str:
        """The config as one JSON argument."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parse :meth:`to_json` output."""
        data = json.loads(text)
        data["flags"] = MigrationFlags(data["flags"])
        return cls(**data)
