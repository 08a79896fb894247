"""Fault injection: a named point of a worker strikes a fault the moment it is reached.

Runs in: worker processes (both sides). The fault matrix (tests/test_fault_matrix.py) arms
one fault per migration with ``MigrationParams.fault`` (``"POINT:FAULT[:SKIP]"``), which a machine
hands each of its workers when it starts (:class:`devstate.worker.jobs.ArmFault`); a
``devstate vm`` destination takes it from its hidden ``--fault`` option. The fault then
strikes at an exact step of the migration, found by the code reaching it, never by timing.
Unarmed, a point costs one comparison.

Points, by the step of a migration they belong to::

    setup     source: data channels connected   destination: a data channel adopted
    precopy   source: a precopy chunk read while the VM runs, about to be shipped
    get       source: a stream's first bytes read from its device after the stop
    send      source: a packet about to go out on a data channel
    put       destination: a stream's bytes written to its device
    record-put  destination: a batch of records (a KVM VM's vCPUs) about to be put
    complete  destination: a stream about to complete its load (firmware)
    resume    destination: devices about to resume, after COMMIT

Faults: ``kill-worker`` (SIGKILL of the worker itself), ``kill-model`` (SIGKILL of the
device model the point is about), ``cut-channels`` (the worker's data channels shut down
both ways), ``corrupt`` (one byte of the packet flipped after its checksum was taken; at record-put,
the first byte of the batch's first record, after its checksum was verified: a record its
device must refuse),
``truncate`` (half the packet sent, then its channel shut down). ``SKIP`` lets that many
hits of the point pass first, e.g. to strike in the middle of a stream.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import socket
from collections.abc import Iterable
from dataclasses import dataclass


class Fault(enum.StrEnum):
    """What strikes at an armed point."""

    KILL_WORKER = "kill-worker"
    KILL_MODEL = "kill-model"
    CUT_CHANNELS = "cut-channels"
    CORRUPT = "corrupt"
    TRUNCATE = "truncate"


POINTS = ("setup", "precopy", "get", "send", "put", "record-put", "complete", "resume")
# Faults that need the bytes in hand: the send point has a packet, record-put its records
# (which cannot be truncated).
PACKET_FAULTS = (Fault.CORRUPT, Fault.TRUNCATE)
BYTES_AT = {"send": PACKET_FAULTS, "record-put": (Fault.CORRUPT,)}


@dataclass(frozen=True, slots=True)
class Armed:
    """One armed fault: strike ``fault`` at the ``skip``+1-th hit of ``point``."""

    point: str
    fault: Fault
    skip: int = 0

    @classmethod
    def parse(cls, text: str) -> Armed:
        """``POINT:FAULT[:SKIP]``; ValueError naming what is wrong."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"fault {text!r}: expected POINT:FAULT[:SKIP]")
        point, fault = parts[0], parts[1]
        if point not in POINTS:
            raise ValueError(f"fault {text!r}: point must be one of {', '.join(POINTS)}")
        try:
            kind = Fault(fault)
        except ValueError:
            raise ValueError(f"fault {text!r}: fault must be one of "
                             f"{', '.join(f.value for f in Fault)}") from None
        if kind in PACKET_FAULTS and kind not in BYTES_AT.get(point, ()):
            raise ValueError(f"fault {text!r}: {kind} needs the bytes in hand: only at "
                             f"{' or '.join(p for p, k in BYTES_AT.items() if kind in k)}")
        skip = int(parts[2]) if len(parts) == 3 else 0
        if skip < 0:
            raise ValueError(f"fault {text!r}: SKIP must be >= 0")
        return cls(point, kind, skip)


class Injector:
    """This process's armed fault and how often its point was reached."""

    def __init__(self) -> None:
        self._armed: Armed | None = None
        self._hits = 0

    def arm(self, text: str | None) -> None:
        """Arm ``POINT:FAULT[:SKIP]`` (None disarms)."""
        self._armed = Armed.parse(text) if text else None
        self._hits = 0

    def armed_at(self, point: str) -> bool:
        """Whether a fault waits at ``point`` (a sender then sends a packet at a time, so
        that SKIP counts packets, whatever the batching)."""
        return self._armed is not None and self._armed.point == point

    def at(self, point: str) -> Fault | None:
        """The fault to strike here and now, if any: each armed fault strikes once."""
        armed = self._armed
        if armed is None or armed.point != point:
            return None
        self._hits += 1
        if self._hits <= armed.skip:
            return None
        self._armed = None
        return armed.fault

    def strike(self, point: str, *, model_pid: int | None = None,
               channels: Iterable[socket.socket] = ()) -> Fault | None:
        """Strike the fault armed at ``point`` that needs no packet; return a packet fault
        for the caller to apply (:func:`spoil`), else None."""
        fault = self.at(point)
        if fault is Fault.KILL_WORKER:
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault is Fault.KILL_MODEL and model_pid is not None:
            os.kill(model_pid, signal.SIGKILL)
        elif fault is Fault.CUT_CHANNELS:
            for sock in channels:
                cut(sock)
        elif fault in PACKET_FAULTS:
            return fault
        return None


def cut(sock: socket.socket) -> None:
    """Shut a channel down both ways: the peer reads EOF, our next send fails."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def spoil(fault: Fault, packet: memoryview) -> memoryview:
    """Apply a packet fault: the bytes to send instead of ``packet`` (the caller cuts the
    channel after a truncated one)."""
    if fault is Fault.CORRUPT:
        packet[len(packet) - 1] ^= 0xFF  # in the payload, after its checksum was taken
        return packet
    return packet[:len(packet) // 2]


# The worker's injector: one per process, armed by messages.ArmFault.
injector = Injector()
