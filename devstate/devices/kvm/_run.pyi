"""Types of the C extension built from _run.c (see that file and run.py)."""

from collections.abc import Sequence
from typing import Final

SNAPSHOT_BYTES: Final[int]

class Runner:
    """One native thread per vCPU looping in KVM_RUN, stopped and resumed together."""

    def __init__(self, fds: Sequence[int], ids: Sequence[int], map_bytes: int,
                 signum: int) -> None: ...
    def start(self, paused: bool, timeout: float, /) -> tuple[int, list[int]]:
        """Start the threads, running or parked; (last arrival ns, late positions)."""
    def stop(self, timeout: float, /) -> tuple[int, list[int]]:
        """Every thread out of KVM_RUN and parked; (last park ns, late positions)."""
    def arm(self) -> None:
        """Wake every parked thread to the entry barrier; return at once."""
    def resume(self, timeout: float, /) -> tuple[int, list[int]]:
        """Every thread back into KVM_RUN (armed first, unless armed); (release ns, late
        positions)."""
    def faults(self) -> list[tuple[int, int, bytes]]:
        """(position, errno, kvm_run snapshot) of each vCPU whose KVM_RUN failed."""
    def close(self) -> None:
        """Stop and join every thread, unmap every kvm_run. Idempotent."""
