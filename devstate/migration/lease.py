"""The main channel after a completed migration, kept as the destination's lease on the VM.

Runs in: both coordinators of a QMP-driven migration, after RESUMED.

RESUMED tells the source that the destination runs the VM; nothing the source sees later
can make that untrue except the destination's own word. So the destination keeps the main
channel open while it holds the VM, and when it lets go of it without the VM going anywhere
(its process ends: ``quit``, or its machine closes on a signal) it first stops every device
and then sends FAILED ``{running: false}``, the same word a failed resume sends
(:mod:`devstate.migration.commit`). Only that word lets the source run its copy again
(QMP ``cont`` after a completed migration: libvirt's roll back when the destination failed
after completion). A lease that ends without it (the process was killed, the network or
host failed, or the VM migrated on from there) proves nothing: the VM may run somewhere,
and the source stays stopped.
"""

from __future__ import annotations

import contextlib

from devstate.errors import DevstateError, PeerFailed
from devstate.migration import commit
from devstate.net import channels
from devstate.net.channels import Channel


async def released(main: Channel) -> bool:
    """Source: wait for the end of the destination's lease; True only if the destination
    said it runs none of the VM (the source may resume), False if the lease ended in any
    other way (the VM may be running there or beyond)."""
    try:
        await channels.expect_control(main)  # FAILED raises; nothing else is expected
    except PeerFailed as exc:
        return exc.not_running
    except (DevstateError, OSError):
        return False
    finally:
        main.close()
    return False


async def release(main: Channel, reason: str) -> None:
    """Destination, once every device here is stopped for good: tell the source that
    nothing runs here, and end the lease."""
    with contextlib.suppress(Exception):  # the source may be gone: nothing to tell
        await commit.failed(main, reason, committed=True)
    main.close()


def hand_on(main: Channel) -> None:
    """Destination whose VM migrated on: end the lease without a word, so that the source
    never takes it for a release (the VM runs elsewhere)."""
    main.close()
