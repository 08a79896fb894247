"""The two-phase commit that ends every migration: exactly one side runs the VM after it.

Runs in: both coordinators, over the main channel (ARCHITECTURE.md §5, rule 1)::

    destination                                  source
    every device put and verified
    LOADED {devices}  ------------------------>  (stop-and-copy done)
                      <------------------------  COMMIT       from here the source will not
    resume every device                                       resume on its own
    RESUMED           ------------------------>  t1: downtime = t1 - t0
      or, if a resume failed: stop and reset
      every device, then FAILED {running: false} ->  the source may resume: nothing runs there

Before COMMIT any failure resumes the source (the destination discards what it loaded).
After COMMIT the destination may be running the VM, so the source stays stopped with its
state intact; the one exception is the destination's own word that it runs nothing.
"""

from __future__ import annotations

import asyncio
import time

from devstate.errors import PeerFailed
from devstate.net import channels
from devstate.net.channels import Channel
from devstate.protocol.control import Commit, Failed, Loaded, Resumed

# After COMMIT the destination only resumes its devices: seconds are generous.
RESUMED_TIMEOUT_S = 30.0


class SourceCommit:
    """The source's half: whether it has committed, and what it may do after a failure."""

    def __init__(self) -> None:
        self.committed = False

    async def commit(self, main: Channel) -> int:
        """Send COMMIT once the destination has LOADED; return when RESUMED arrived (ns,
        this host's monotonic clock)."""
        await channels.send(main, Commit())
        self.committed = True
        async with asyncio.timeout(RESUMED_TIMEOUT_S):
            await channels.expect(main, Resumed)
        return time.monotonic_ns()

    def may_resume(self, failure: BaseException) -> bool:
        """Whether the source may resume its VM after ``failure``: always before COMMIT;
        after it only if the destination said it runs none of the VM."""
        return not self.committed or (isinstance(failure, PeerFailed) and failure.not_running)


async def await_commit(main: Channel, loaded: int) -> None:
    """The destination's first half: say every device is LOADED, wait for COMMIT."""
    await channels.send(main, Loaded(loaded))
    await channels.expect(main, Commit)


async def resumed(main: Channel) -> None:
    """The destination's second half: the VM runs here now."""
    await channels.send(main, Resumed())


async def failed(main: Channel, reason: str, *, committed: bool) -> None:
    """Tell the source the migration failed here. After COMMIT this is only sent once every
    device here is stopped and reset: ``running: false`` lets the source resume."""
    await channels.send(main, Failed(reason, running=False if committed else None))
