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
    end       source: a stream's END about to be sealed with the stream's digest
    put       destination: a stream's bytes written to its device
    record-put  destination: a batch of records (a KVM VM's vCPUs) about to be put
    complete  destination: a stream about to complete its load (firmware)
    resume    destination: devices about to resume, after COMMIT

Faults: ``kill-worker`` (SIGKILL of the worker itself), ``freeze-worker`` (SIGSTOP of
the worker itself: a worker that neither answers nor dies, until SIGCONT), ``busy-worker``
and ``block-worker`` (the worker's loop keeps its CPU busy, or sleeps, for STALL_S, then
goes on: a worker that does not answer for a while, runnable or blocked: the liveness
rule tells the two apart), ``kill-model``
(SIGKILL of the device model the point is about), ``cut-channels`` (the worker's data
channels shut down both ways), ``truncate`` (half the packet sent, then its channel shut
down), and two that change bytes where exactly one check can see them:

* ``corrupt`` at ``send``: one byte of the packet flipped after its checksum was taken
  (the packet checksum refuses it); at ``record-put``: the first byte of the batch's first
  record, after its checksum was verified (the device refuses it); at ``get``: the last
  byte of the stream's first chunk, *before* its checksum is taken (every packet and the
  END are valid: only the destination device's own validation, when its load completes,
  RESUMING -> STOP, the firmware step, refuses the stream); at ``end``: the END sealed with
  a wrong digest before its checksum is taken (only the END digest check refuses it).
* ``alter`` at ``record-put``: a register (RBP) of the batch's first vCPU record changed
  after its checksum was verified, to a value KVM accepts: the put succeeds with state the
  source never had, which only the digests compared after the resume can see, or, in a
  live guest (RBP holds a value the guest program checks), the guest itself. At ``get``
  on a guest RAM range: a word of vCPU 0's checksum block changed before the packet's
  checksum is taken: every packet and the END are valid, the page lands as sent, and only
  the guest's own checks (and the host's recount of its checksum) can see it.

``SKIP`` lets that many hits of the point pass first, e.g. to strike in the middle of a
stream.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from devstate.devices import Device
from devstate.devices.kvm import guest_program as gp
from devstate.devices.kvm.device import KvmVcpuDevice
from devstate.devices.kvm.guest import GuestLayout
from devstate.devices.kvm.memory import EXTENT
from devstate.devices.kvm.record import Section

# struct kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp ..., 8 bytes each.
_RBP = 7 * 8
# How long busy-worker and block-worker hold the worker's loop: longer than the peer
# timeouts the tests set (2 s), far shorter than the liveness rule's ceiling (60 s).
STALL_S = 6.0


class Fault(enum.StrEnum):
    """What strikes at an armed point."""

    KILL_WORKER = "kill-worker"
    FREEZE_WORKER = "freeze-worker"
    BUSY_WORKER = "busy-worker"
    BLOCK_WORKER = "block-worker"
    KILL_MODEL = "kill-model"
    CUT_CHANNELS = "cut-channels"
    CORRUPT = "corrupt"
    TRUNCATE = "truncate"
    ALTER = "alter"


POINTS = ("setup", "precopy", "get", "send", "end", "put", "record-put", "complete", "resume")
# Faults that need the bytes in hand, and the points that have them: send a packet,
# record-put its records (which cannot be truncated), get a stream chunk, end the END's
# digest.
BYTES_FAULTS = (Fault.CORRUPT, Fault.TRUNCATE, Fault.ALTER)
BYTES_AT = {"send": (Fault.CORRUPT, Fault.TRUNCATE),
            "record-put": (Fault.CORRUPT, Fault.ALTER),
            "get": (Fault.CORRUPT, Fault.ALTER), "end": (Fault.CORRUPT,)}


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
        if kind in BYTES_FAULTS and kind not in BYTES_AT.get(point, ()):
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
        """Strike the fault armed at ``point`` that needs no bytes; return a fault that
        does, for the caller to apply (:func:`spoil`, :func:`spoil_record`, :func:`spoil_digest`),
        else None."""
        fault = self.at(point)
        if fault is Fault.KILL_WORKER:
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault is Fault.FREEZE_WORKER:
            os.kill(os.getpid(), signal.SIGSTOP)
        elif fault is Fault.BUSY_WORKER:
            until = time.monotonic() + STALL_S
            while time.monotonic() < until:  # on a CPU, answering nothing
                pass
        elif fault is Fault.BLOCK_WORKER:
            time.sleep(STALL_S)  # blocked, answering nothing
        elif fault is Fault.KILL_MODEL and model_pid is not None:
            os.kill(model_pid, signal.SIGKILL)
        elif fault is Fault.CUT_CHANNELS:
            for sock in channels:
                cut(sock)
        elif fault in BYTES_FAULTS:
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
    if fault is Fault.ALTER:
        _alter_guest_page(packet)
        return packet
    return packet[:len(packet) // 2]


def _alter_guest_page(payload: memoryview) -> None:
    """ALTER at ``get``: in the first stop-and-copy chunk of guest RAM, flip a bit of vCPU
    0's first checksum word. The chunk is a run of extents: the whole range from address 0
    (no precopy), or the pages dirtied last (vCPU 0's page is, once vCPU 0 ticked after
    precopy's last round: its counter moved).
    vCPU 0's page follows the GDT, whose size depends on the vCPU count: read from the
    params block when the chunk carries it, else that of a guest of up to 253 vCPUs (whose
    GDT ends in the same page)."""
    extents, at = [], 0
    while at + EXTENT.size <= len(payload):
        offset, length, _ = EXTENT.unpack_from(payload, at)
        extents.append((offset, payload[at + EXTENT.size:at + EXTENT.size + length]))
        at += EXTENT.size + length
    vcpus = 1
    for offset, data in extents:
        if offset <= gp.PARAMS_VCPUS and offset + len(data) >= gp.PARAMS_VCPUS + 4:
            vcpus = int.from_bytes(data[gp.PARAMS_VCPUS - offset:gp.PARAMS_VCPUS - offset + 4],
                                   "little")
    target = GuestLayout.of(vcpus, 1 << 30).area(0) + gp.CHECKSUM_BLOCK
    for offset, data in extents:
        if offset <= target < offset + len(data):
            data[target - offset] ^= 0x01
            return
    raise ValueError("get:alter strikes the first chunk of guest RAM that holds vCPU 0's page")


def spoil_record(fault: Fault, device: Device, record: memoryview) -> None:
    """Apply a record fault to ``record`` (verified on arrival, about to be put) in place."""
    if fault is Fault.CORRUPT:
        record[0] ^= 0xFF  # the record header: only the device can refuse it
        return
    # ALTER: RBP takes any value, so KVM loads it and the put's readback agrees with it
    # (and a live guest holds a value of its own there, which it checks every loop).
    assert isinstance(device, KvmVcpuDevice), "batched records are KVM vCPUs"
    device.opened().parse(record)[Section.REGS][_RBP] ^= 0x01


def spoil_digest(digest: bytes) -> bytes:
    """A stream digest that no stream of the same packets has (an END sealed wrong)."""
    return bytes(b ^ 0xFF for b in digest)


# The worker's injector: one per process, armed by messages.ArmFault.
injector = Injector()
