"""Types of the C extension built from _steps.c (see that file and engine.py)."""

from collections.abc import Sequence
from typing import Final

STEP_BYTES: Final[int]

def run(program: bytes, template: bytes, mask: bytes, fds: Sequence[int], ids: Sequence[int],
        records: Sequence[memoryview], writable: bool, /) -> tuple[int, int, int, int, int, int]:
    """Run ``program`` once per vCPU, the GIL released (see _steps.c)."""
