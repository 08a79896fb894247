"""The phases of a migration's life, named as QEMU's MigrationStatus names them.

One enum for the coordinator (``on_status`` callbacks), the QMP controller (``query-migrate``
and MIGRATION events) and the reports, so that a phase has one spelling everywhere: a
controller written for QEMU reads devstate's statuses unchanged.
"""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    """Where a migration is. The VM runs on the source until ``DEVICE`` (the stop)."""

    NONE = "none"              # no migration yet
    SETUP = "setup"            # estimating, connecting, both sides getting ready
    ACTIVE = "active"          # the VM still runs (precopy streams, or waiting to switch over)
    PRE_SWITCHOVER = "pre-switchover"  # ready to stop; waits for the controller's go-ahead
    DEVICE = "device"          # the VM is stopped: stop-and-copy of the device state
    COMPLETED = "completed"    # the destination runs the VM
    FAILED = "failed"          # ended; the VM runs where the error says
    CANCELLING = "cancelling"  # a cancel is being carried out
    CANCELLED = "cancelled"    # ended by a cancel; the source runs the VM

    @property
    def ended(self) -> bool:
        """Whether the migration is over (or never began)."""
        return self in (Phase.NONE, Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED)
