"""The VFIO migration v2 state machine (devstate.devices.vfio.uapi), checked exhaustively.

The oracle is the kernel's own algorithm, transcribed: ``vfio_from_fsm_table`` walked with
``state_flags_table`` skips (drivers/vfio/vfio_main.c, vfio_mig_get_next_state()), with the
2026 fix that a blocked arc returns -EINVAL instead of looping. Every (cur, new, features)
request must give the same path from both.
"""

from __future__ import annotations

import errno
import itertools

import pytest

from devstate.devices.vfio.uapi import (
    ARCS,
    SAVING_GROUP,
    InvalidTransition,
    MigrationFlags,
    Op,
    Reply,
    Request,
    Session,
    VfioState,
    is_supported,
    next_path,
    session_effect,
)

S = VfioState
F = MigrationFlags
ALL = F.STOP_COPY | F.P2P | F.PRE_COPY
FEATURE_SETS = [F.STOP_COPY, F.STOP_COPY | F.P2P, F.STOP_COPY | F.PRE_COPY, ALL]

# vfio_from_fsm_table[cur][new]: the next state on the way from cur to new.
KERNEL_TABLE: dict[VfioState, dict[VfioState, VfioState]] = {
    S.STOP: {S.STOP: S.STOP, S.RUNNING: S.RUNNING_P2P, S.PRE_COPY: S.RUNNING_P2P,
             S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.STOP_COPY,
             S.RESUMING: S.RESUMING, S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR},
    S.RUNNING: {S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
                S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.RUNNING_P2P,
                S.RESUMING: S.RUNNING_P2P, S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR},
    S.PRE_COPY: {S.STOP: S.RUNNING, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
                 S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.PRE_COPY_P2P,
                 S.RESUMING: S.RUNNING, S.RUNNING_P2P: S.RUNNING, S.ERROR: S.ERROR},
    S.PRE_COPY_P2P: {S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING_P2P,
                     S.PRE_COPY: S.PRE_COPY, S.PRE_COPY_P2P: S.PRE_COPY_P2P,
                     S.STOP_COPY: S.STOP_COPY, S.RESUMING: S.RUNNING_P2P,
                     S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR},
    S.STOP_COPY: {S.STOP: S.STOP, S.RUNNING: S.STOP, S.PRE_COPY: S.ERROR,
                  S.PRE_COPY_P2P: S.ERROR, S.STOP_COPY: S.STOP_COPY, S.RESUMING: S.STOP,
                  S.RUNNING_P2P: S.STOP, S.ERROR: S.ERROR},
    S.RESUMING: {S.STOP: S.STOP, S.RUNNING: S.STOP, S.PRE_COPY: S.STOP,
                 S.PRE_COPY_P2P: S.STOP, S.STOP_COPY: S.STOP, S.RESUMING: S.RESUMING,
                 S.RUNNING_P2P: S.STOP, S.ERROR: S.ERROR},
    S.RUNNING_P2P: {S.STOP: S.STOP, S.RUNNING: S.RUNNING, S.PRE_COPY: S.RUNNING,
                    S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.STOP,
                    S.RESUMING: S.STOP, S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR},
    S.ERROR: {new: S.ERROR for new in S},
}
KERNEL_STATE_FLAGS: dict[VfioState, int] = {
    S.STOP: F.STOP_COPY, S.RUNNING: F.STOP_COPY, S.STOP_COPY: F.STOP_COPY,
    S.RESUMING: F.STOP_COPY, S.RUNNING_P2P: F.STOP_COPY | F.P2P,
    S.PRE_COPY: F.STOP_COPY | F.PRE_COPY, S.PRE_COPY_P2P: ALL, S.ERROR: ~0,
}


def kernel_path(cur: VfioState, new: VfioState, flags: MigrationFlags) -> list[VfioState] | None:
    """The kernel's answer: the states its driver loop visits, or None for -EINVAL."""

    def has(state: VfioState) -> bool:
        return (KERNEL_STATE_FLAGS[state] & flags) == KERNEL_STATE_FLAGS[state]

    if not has(cur) or not has(new):
        return None
    path = [cur]
    while path[-1] != new:
        nxt = KERNEL_TABLE[path[-1]][new]
        while nxt is not S.ERROR and not has(nxt):
            nxt = KERNEL_TABLE[nxt][new]
        if nxt is S.ERROR:
            return None
        path.append(nxt)
    return path


def ours(cur: VfioState, new: VfioState, flags: MigrationFlags) -> list[VfioState] | None:
    try:
        return next_path(cur, new, flags)
    except InvalidTransition as exc:
        assert exc.errno == errno.EINVAL
        return None


@pytest.mark.parametrize("flags", FEATURE_SETS, ids=lambda f: repr(f))
def test_every_request_matches_the_kernel(flags: MigrationFlags) -> None:
    for cur, new in itertools.product(S, S):
        assert ours(cur, new, flags) == kernel_path(cur, new, flags), (cur, new)


@pytest.mark.parametrize("flags", FEATURE_SETS, ids=lambda f: repr(f))
def test_paths_use_only_existing_arcs_and_cross_the_saving_group_edge_only_at_their_ends(
        flags: MigrationFlags) -> None:
    arcs = {(a.src, a.dst) for a in ARCS if a.exists(flags)}
    for cur, new in itertools.product(S, S):
        path = ours(cur, new, flags)
        if path is None:
            continue
        assert path[0] == cur and path[-1] == new
        assert all(pair in arcs for pair in itertools.pairwise(path))
        assert all(is_supported(s, flags) for s in path)
        inside = [s in SAVING_GROUP for s in path[1:-1]]
        if cur in SAVING_GROUP and new in SAVING_GROUP:
            assert all(inside), path  # moves within the one session
        else:
            assert not any(inside), path


@pytest.mark.parametrize(("cur", "new", "flags", "expected"), [
    (S.RUNNING, S.STOP_COPY, ALL, [S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY]),
    (S.RUNNING, S.STOP_COPY, F.STOP_COPY, [S.RUNNING, S.STOP, S.STOP_COPY]),
    (S.RUNNING, S.STOP, ALL, [S.RUNNING, S.RUNNING_P2P, S.STOP]),
    (S.RUNNING, S.STOP, F.STOP_COPY, [S.RUNNING, S.STOP]),
    (S.PRE_COPY, S.STOP_COPY, ALL, [S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY]),
    (S.PRE_COPY, S.STOP_COPY, F.STOP_COPY | F.PRE_COPY, [S.PRE_COPY, S.STOP_COPY]),
    (S.RESUMING, S.RUNNING, ALL, [S.RESUMING, S.STOP, S.RUNNING_P2P, S.RUNNING]),
    (S.STOP_COPY, S.RUNNING, ALL, [S.STOP_COPY, S.STOP, S.RUNNING_P2P, S.RUNNING]),
    (S.PRE_COPY, S.RESUMING, ALL,
     [S.PRE_COPY, S.RUNNING, S.RUNNING_P2P, S.STOP, S.RESUMING]),
    (S.STOP, S.PRE_COPY, ALL, [S.STOP, S.RUNNING_P2P, S.RUNNING, S.PRE_COPY]),
    (S.RUNNING, S.RUNNING, ALL, [S.RUNNING]),
])
def test_reference_examples(cur: VfioState, new: VfioState, flags: MigrationFlags,
                            expected: list[VfioState]) -> None:
    assert next_path(cur, new, flags) == expected


@pytest.mark.parametrize(("cur", "new", "flags", "why"), [
    (S.STOP_COPY, S.PRE_COPY, ALL, "cannot go back to precopy"),
    (S.STOP_COPY, S.PRE_COPY_P2P, ALL, "cannot go back to precopy"),
    (S.RUNNING, S.ERROR, ALL, "ERROR cannot be requested"),
    (S.ERROR, S.RUNNING, ALL, "only a reset recovers"),
    (S.ERROR, S.ERROR, ALL, "only a reset recovers"),
    (S.RUNNING, S.RUNNING_P2P, F.STOP_COPY, "RUNNING_P2P needs migration feature(s) P2P"),
    (S.RUNNING, S.PRE_COPY, F.STOP_COPY | F.P2P, "PRE_COPY needs migration feature(s) PRE"),
    (S.RUNNING, S.PRE_COPY_P2P, F.STOP_COPY | F.PRE_COPY, "needs migration feature(s) P2P"),
])
def test_refused_requests_are_einval(cur: VfioState, new: VfioState, flags: MigrationFlags,
                                     why: str) -> None:
    with pytest.raises(InvalidTransition) as info:
        next_path(cur, new, flags)
    assert info.value.errno == errno.EINVAL
    assert why in str(info.value)


def test_flags_without_stop_copy_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="STOP_COPY is mandatory"):
        next_path(S.RUNNING, S.STOP, F.P2P)


def test_sessions_open_on_the_four_start_arcs_only() -> None:
    opening = {(a.src, a.dst) for a in ARCS if a.session.opens}
    assert opening == {(S.RUNNING, S.PRE_COPY), (S.RUNNING_P2P, S.PRE_COPY_P2P),
                       (S.STOP, S.STOP_COPY), (S.STOP, S.RESUMING)}
    assert session_effect(S.STOP, S.RESUMING) is Session.OPEN_RESUME


def test_sessions_end_when_leaving_the_saving_group_or_resuming() -> None:
    for arc in ARCS:
        leaves_group = arc.src in SAVING_GROUP and arc.dst not in SAVING_GROUP
        assert arc.session.ends == (leaves_group or arc.src is S.RESUMING), arc
        inside_group = arc.src in SAVING_GROUP and arc.dst in SAVING_GROUP
        assert (arc.session is Session.KEEP) == inside_group, arc


@pytest.mark.parametrize("flags", FEATURE_SETS, ids=lambda f: repr(f))
def test_a_combination_opens_at_most_one_session_and_only_on_its_last_arc(
        flags: MigrationFlags) -> None:
    for cur, new in itertools.product(S, S):
        path = ours(cur, new, flags) or []
        effects = [session_effect(a, b) for a, b in itertools.pairwise(path)]
        assert not any(e.opens for e in effects[:-1]), path


def test_messages_round_trip() -> None:
    request = Request(seq=7, op=Op.SET_STATE, arg=S.STOP_COPY)
    assert Request.unpack(request.pack()) == request
    reply = Reply(seq=7, op=Op.SET_STATE, state=S.ERROR, errno=errno.EINVAL,
                  digest=bytes(range(16)), detail="stream incomplete (chunk 17 missing)")
    assert Reply.unpack(reply.pack()) == reply


def test_malformed_messages_are_value_errors() -> None:
    with pytest.raises(ValueError):
        Request.unpack(b"\x00" * 5)
    with pytest.raises(ValueError):
        Reply.unpack(b"\x00" * 5)
