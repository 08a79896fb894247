"""One device's load as its packets arrive: reassembly in sequence order, counts, digest.

Runs in: a destination worker, the owner of the device. With spread routing a stream's
packets come over several channels, so they may arrive out of order: an early packet is
held in the slot it arrived in (nothing is copied) until the ones before it came. A gap
is never skipped, a duplicate or a packet after the END is an error (ARCHITECTURE.md §5,
rule 2), and the END's byte count and digest must match what arrived (rule 3).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from devstate.devices import Device, RecordDevice
from devstate.errors import IntegrityError, ProtocolError
from devstate.protocol import wire

# Gives back the slot a payload sits in.
Release = Callable[[], None]


class Packet(NamedTuple):
    """A stream's next packet for its device: data (and the slot's release), or its END."""

    payload: memoryview | None
    release: Release | None
    end: wire.EndOfState | None


@dataclass(slots=True)
class _Early:
    """A packet that arrived before its turn, held (in its slot) until the ones before it."""

    kind: wire.PacketKind
    checksum: int
    payload: memoryview
    release: Release | None
    end: wire.EndOfState | None


@dataclass(slots=True)
class Incoming:
    """Progress of one device's load."""

    device: Device
    next_seq: int = 0
    bytes: int = 0
    packets: int = 0
    start_ns: int = 0
    end_ns: int = 0
    done_ns: int = 0
    ended: bool = False
    digest: wire.StateDigest = field(default_factory=wire.StateDigest)
    early: dict[int, _Early] = field(default_factory=dict)
    queue: asyncio.Queue[Packet] | None = None

    def in_order(self, kind: wire.PacketKind, seq: int, checksum: int, payload: memoryview,
                 release: Release | None) -> list[Packet]:
        """Take stream packet ``seq``; return the packets now due, in sequence order
        (none if it came early: it waits, in its slot, for those before it)."""
        if seq < self.next_seq or seq in self.early:
            raise ProtocolError("packet.seq", f"{self.device.id}: seq {seq} arrived twice")
        end = wire.decode_end(payload) if kind is wire.PacketKind.END else None
        if end is not None and release is not None:
            release()  # decoded: the slot is free
            release = None
        if seq != self.next_seq:
            assert end is not None or release is not None, "chunks always sit in slots"
            self.early[seq] = _Early(kind, checksum, payload, release, end)
            return []
        due = [self._next(checksum, payload, release, end)]
        while self.next_seq in self.early and not self.ended:
            early = self.early.pop(self.next_seq)
            due.append(self._next(early.checksum, early.payload, early.release, early.end))
        return due

    def _next(self, checksum: int, payload: memoryview, release: Release | None,
              end: wire.EndOfState | None) -> Packet:
        """The next packet in sequence: count it into the device's totals and digest."""
        self.next_seq += 1
        if end is not None:
            self.ended = True
            if self.early:
                raise ProtocolError("packet.seq", f"{self.device.id}: packets after its END")
            return Packet(None, None, end)
        self.packets += 1
        self.digest.add(checksum)
        if not self.start_ns:
            self.start_ns = time.monotonic_ns()
        return Packet(payload, release, None)

    def check_end(self, end: wire.EndOfState) -> None:
        """The END's totals and digest against what arrived; IntegrityError if they differ."""
        if end.total_bytes != self.bytes or end.packets != self.packets:
            raise IntegrityError("end.bytes", f"{self.device.id}: source sent "
                                 f"{end.total_bytes} B in {end.packets} packets, received "
                                 f"{self.bytes} B in {self.packets}")
        if end.digest != self.digest.digest():
            raise IntegrityError("end.digest", f"{self.device.id}: state digest mismatch")

    def put_record(self, payload: memoryview) -> None:
        """Put the device's one record, on the loop."""
        # A record is its device's whole state in one packet, whose verified checksum is
        # its digest: it needs no END of its own.
        device = self.device
        assert isinstance(device, RecordDevice)
        start = time.monotonic_ns()
        device.put(payload)
        self.record_loaded(len(payload), start, time.monotonic_ns())

    def record_loaded(self, length: int, start_ns: int, end_ns: int) -> None:
        """The device's record of ``length`` B was put from ``start_ns`` to ``end_ns``."""
        self.start_ns = start_ns
        self.bytes = length
        self.packets = 1
        self.end_ns = self.done_ns = end_ns

    def release_early(self) -> None:
        """After a failed load: give back the slots of packets held early."""
        for early in self.early.values():
            if early.release is not None:
                early.release()
        self.early.clear()
