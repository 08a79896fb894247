"""The exit statuses of ``devstate``: one meaning each, so a script can tell them apart.

2 is argparse's for a usage error, so a migration that completed without its digests
verifying gets a status of its own (3); signals follow the shell's 128 + N convention.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Iterable
from typing import Protocol


class Exit(enum.IntEnum):
    """What ``devstate``'s exit status says."""

    OK = 0            # done; a migration's every device verified bit-exact
    ERROR = 1         # a DevstateError: its message (and with --json, an error object)
    USAGE = 2         # the command line is wrong (argparse)
    UNVERIFIED = 3    # the migration completed but a device's digests did not match
    INTERRUPTED = 128 + signal.SIGINT   # Ctrl-C: everything it started was stopped
    TERMINATED = 128 + signal.SIGTERM   # SIGTERM: the same clean unwind


class Verifiable(Protocol):
    """A migration's report, as far as its exit status goes."""

    @property
    def verified(self) -> bool:
        """Whether every device's digests matched on both sides."""


def status_of(reports: Iterable[Verifiable]) -> Exit:
    """A finished command's status: OK when every migration verified, else UNVERIFIED."""
    return Exit.OK if all(r.verified for r in reports) else Exit.UNVERIFIED
