"""The two-phase commit that ends every migration: exactly one side runs the VM after it.

Runs in: both coordinators, over the main channel (ARCHITECTURE.md §5, rule 1)::

    destination                                  source
    every device put and verified
    LOADED {devices}  ------------------------>  (stop-and-copy done)
                      <------------------------  COMMIT       from here the source will not
    resume every device                                       resume on its own
      (a live guest's vCPU threads, woken
      before the stop, are only released)
    RESUMED           ------------------------>  t1: downtime = t1 - t0
      or, if a resume failed: stop and reset
      every device, then FAILED {running: false} ->  the source may resume: nothing runs there

Before COMMIT any failure resumes the source (the destination discards what it loaded).
After COMMIT the destination may be running the VM, so the source stays stopped with its
state intact; the one exception is the destination's own word that it runs nothing.
"""

from __future__ import annotations

import time

from devstate.errors import PeerFailed
from devstate.migration import liveness
from devstate.net import channels
from devstate.net.channels import Channel
from devstate.protocol.control import Commit, Failed, Loaded, Resumed

# After RESUMED the destination gathers its results (and digests, if asked), off the
# downtime: seconds are generous.
RESUMED_TIMEOUT_S = 30.0


class SourceCommit:
    """The source's half: whether it has committed, and what it may do after a failure."""

    def __init__(self) -> None:
        self.committed = False
        self.resumed = False  # the destination said RESUMED: the VM runs there

    async def commit(self, main: Channel, bound: liveness.PeerBound) -> int:
        """Send COMMIT once the destination has LOADED; return when RESUMED arrived (ns,
        this host's monotonic clock). The destination only resumes its devices meanwhile:
        a destination silent for the liveness ``bound`` raises PeerSilent."""
        await channels.send(main, Commit())
        self.committed = True
        await liveness.expect(main, Resumed, bound, "destination", "its resume")
        self.resumed = True
        return time.monotonic_ns()

    def may_resume(self, failure: BaseException) -> bool:
        """Whether the source may resume its VM after ``failure``: always before COMMIT;
        after it only if the destination said it runs none of the VM."""
        return not self.committed or (isinstance(failure, PeerFailed) and failure.not_running)


async def await_commit(main: Channel, loaded: int, bound: liveness.PeerBound) -> None:
    """The destination's first half: say every device is LOADED, wait for COMMIT (the
    source's last heartbeats may come first; a source silent for ``bound`` raises
    PeerSilent, and the destination discards)."""
    await channels.send(main, Loaded(loaded))
    await liveness.expect(main, Commit, bound, "source", "the wait for COMMIT")


async def resumed(main: Channel) -> None:
    """The destination's second half: the VM runs here now."""
    await channels.send(main, Resumed())


async def failed(main: Channel, reason: str, *, committed: bool) -> None:
    """Tell the source the migration failed here. After COMMIT this is only sent once every
    device here is stopped and reset: ``running: false`` lets the source resume."""
    await channels.send(main, Failed(reason, running=False if committed else None))
