"""Whose monotonic clock a time is on.

Runs in: both coordinators. The destination reports its times (its READY, each device's
load, its resume) on its own ``CLOCK_MONOTONIC``. Another host's clock has its own origin,
so the source turns them into its own by the READY exchange: when READY arrived here less
when it left there, an upper bound by one channel latency (and by however late this side
looked). Two processes of one boot in one time namespace read the same clock: then the
times need no shift at all, and taking the exchange's would move every destination time,
and the downtime's end, later by that latency (0.2-1.4 ms measured on a local migration).
"""

from __future__ import annotations

import os

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_TIME_NAMESPACE = "/proc/self/ns/time"


def monotonic_clock_id() -> str:
    """An id of this process's ``CLOCK_MONOTONIC``: the boot it counts from and the time
    namespace that may offset it; '' where either cannot be read (then no two are equal)."""
    try:
        with open(_BOOT_ID, encoding="ascii") as f:
            boot = f.read().strip()
        namespace = os.stat(_TIME_NAMESPACE).st_ino
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def shift_to_ours(ours_at_ready: int, theirs_at_ready: int, their_clock: str | None) -> int:
    """ns to add to a peer's monotonic time to read it on ours: 0 when the peer said it
    reads this same clock (``their_clock``, its :func:`monotonic_clock_id`); else the
    READY exchange's difference."""
    mine = monotonic_clock_id()
    if mine and their_clock == mine:
        return 0
    return ours_at_ready - theirs_at_ready
