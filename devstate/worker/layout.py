"""The arena's layout for a migration: the slot classes of every worker's partition.

Both sides derive it from the same parameters and device table, so a packet's slot fits on
either side: records take the largest record of the table, chunks ``chunk_bytes``.
"""

from __future__ import annotations

from devstate.arena.slots import Layout, SlotClass
from devstate.config.params import MigrationParams
from devstate.config.spec import DeviceTable, Shape
from devstate.protocol import wire

# Slot classes, in this order, in every worker's partition.
RECORD_CLASS = 0
CHUNK_CLASS = 1
WINDOW_CLASS = 2


def arena_layout(params: MigrationParams, table: DeviceTable) -> Layout:
    """The arena layout for ``table`` moved with ``params``: the same on both sides."""
    largest = max((d.size for d in table if d.shape is Shape.RECORD), default=0)
    record = wire.PACKET_HEADER_BYTES + max(largest, 64)
    window = max(params.window_bytes, 4 * record)
    return Layout(params.workers, (
        SlotClass(record, params.record_slots),
        SlotClass(wire.PACKET_HEADER_BYTES + params.chunk_bytes, params.chunk_slots),
        SlotClass(window, params.window_slots),
    ))
