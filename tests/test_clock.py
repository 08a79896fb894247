"""Whose monotonic clock a destination's times are on: the same clock needs no shift."""

from __future__ import annotations

import subprocess
import sys
import time

from devstate.migration.clock import monotonic_clock_id, shift_to_ours


def test_another_process_of_this_boot_reads_the_same_clock() -> None:
    mine = monotonic_clock_id()
    assert mine.count("/") == 1 and all(mine.split("/"))
    code = ("import time; from devstate.migration.clock import monotonic_clock_id as c; "
            "print(c(), time.monotonic_ns())")
    before = time.monotonic_ns()
    theirs, their_ns = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                      text=True, check=True).stdout.split()
    after = time.monotonic_ns()
    assert theirs == mine
    assert before < int(their_ns) < after  # the same clock indeed


def test_the_same_clock_takes_no_shift_another_the_ready_exchange() -> None:
    mine = monotonic_clock_id()
    assert shift_to_ours(5_000_000, 3_700_000, mine) == 0
    assert shift_to_ours(5_000_000, 3_700_000, "another-boot/1") == 1_300_000
    assert shift_to_ours(5_000_000, 3_700_000, None) == 1_300_000  # an older peer
    assert shift_to_ours(5_000_000, 3_700_000, "") == 1_300_000
