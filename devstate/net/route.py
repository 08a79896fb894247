"""Which data channel carries a packet, and which worker on each side owns each channel.

A migration has N data channels, set independently of either side's worker count. Channel
``k`` belongs to source worker ``k % S`` and destination worker ``k % D``: each worker sends
or receives on its channels directly, and N, S and D may all differ.

Routing (``MigrationParams.routing``, :class:`~devstate.config.params.Routing`):

* ``affinity``: all of a device's packets ride its *home* channel, the one its source owner
  owns (``owner % N``; with fewer channels than workers, a worker without a channel hands
  its packets to the home channel's owner).
* ``spread``: a stream's packet ``seq`` rides channel ``(home + seq) % N``, so one large
  device uses every channel; records go round-robin over the channels.

Whenever the channel's owner is not the device's owner (on either side) the packet is
handed over through the arena (:mod:`devstate.worker.handoff`): the slot's place moves, the bytes
do not. The destination reassembles each stream in sequence order at its owner.
"""

from __future__ import annotations

from dataclasses import dataclass

from devstate.config.params import Routing

# The channel a report gives a stream that rode every channel (spread routing).
SPREAD = -1


@dataclass(frozen=True, slots=True)
class Routes:
    """The channel map of one side: ``channels`` data channels over ``workers`` workers."""

    channels: int
    workers: int
    routing: Routing = Routing.AFFINITY

    def __post_init__(self) -> None:
        if self.channels < 1 or self.workers < 1:
            raise ValueError("routes need at least one channel and one worker")

    def channel_owner(self, channel: int) -> int:
        """The worker of this side that sends or receives on ``channel``."""
        return channel % self.workers

    def channels_of(self, worker: int) -> tuple[int, ...]:
        """The channels ``worker`` owns (none if there are fewer channels than workers)."""
        return tuple(range(worker, self.channels, self.workers))

    def home(self, owner: int) -> int:
        """The home channel of the devices a source worker owns."""
        return owner % self.channels

    def channel(self, owner: int, n: int) -> int:
        """The channel of source worker ``owner``'s packet ``n``: a stream's packet ``seq``
        (its END included), or its ``n``-th record."""
        if self.routing is Routing.SPREAD:
            return (self.home(owner) + n) % self.channels
        return self.home(owner)
