"""What crosses a channel: data packets, channel hellos and control messages.

All integers are little-endian. Decoders are strict: anything malformed raises
:class:`~devstate.errors.ProtocolError` naming the field, and sizes are bounded before
anything is allocated for them.

Data packet (data channels)::

    0  magic    u32  'DSTP'
    4  version  u16  1
    6  flags    u16  exactly one of RECORD, CHUNK, END, FIN, RECORDS
    8  device   u32  index in the machine's device table (checked at handshake)
    12 seq      u32  packet number within the device's state, from 0
    16 length   u32  payload bytes (bounded by the receiver's slot size)
    20 reserved u32  0
    24 checksum u64  xxh3_64(payload, seed=xxh3_64(bytes 0..23)): covers header and payload
    32 payload

A RECORD packet is a record device's whole state and ends it. A RECORDS packet is a batch of
whole records (a KVM VM's vCPUs, got in one call), each ending its device; ``device`` is the
first one's index, ``seq`` 0, and the payload::

    count u32 | length u32 | stride u32 | reserved u32 | device u32 x count | 0-4 bytes to 8 |
    count x stride bytes: record i is ``length`` bytes at ``i x stride`` from here

One header, one checksum and one send per batch instead of per record: on the critical path
each costs Python time per vCPU on both sides. A FIN packet ends a data
channel: device 0, ``seq`` the number of packets sent on the channel before it, no payload.
An END packet closes a stream device's state; its payload is ``digest[16] | bytes u64 |
packets u32 | reserved u32``. The digest is xxh3_128 over the device's packet checksums in sequence
order (:class:`StateDigest`): each checksum already covers its packet's bytes, so the
digest proves every byte, the order and the count without a second pass over the data.

Channel hello (first bytes on every channel)::

    magic 'DSTH' u32 | version u16 | kind u16 (MAIN 0, DATA 1) | index u16 | channels u16 |
    reserved u32 | migration id [16]

Control message (main channel)::

    magic 'DSTC' u32 | version u16 | type u16 | length u32 | checksum u32 (xxh32 of body) |
    body: UTF-8 JSON object, at most MAX_CONTROL_BYTES
"""

from __future__ import annotations

import enum
import json
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import xxhash

from devstate.errors import IntegrityError, ProtocolError

# JSON as control bodies carry it: parsed by json.loads, checked field by field.
JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]
JsonObject = dict[str, JsonValue]
F = TypeVar("F", bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"])

VERSION = 1

PACKET_MAGIC = 0x50545344  # b"DSTP"
HELLO_MAGIC = 0x48545344   # b"DSTH"
HELLO_TLS = 0x1            # hello flag: TLS follows the plaintext hello
CONTROL_MAGIC = 0x43545344  # b"DSTC"

_PACKET = struct.Struct("<IHHIIIIQ")
_HELLO = struct.Struct("<IHHHHI16s")
_CONTROL = struct.Struct("<IHHII")
_END = struct.Struct("<16sQII")
_RECORDS = struct.Struct("<IIII")

PACKET_HEADER_BYTES = _PACKET.size
HELLO_BYTES = _HELLO.size
CONTROL_HEADER_BYTES = _CONTROL.size
END_PAYLOAD_BYTES = _END.size
# Control messages carry the device table and per-device results; 4 MiB holds a 1024-vCPU
# machine's report many times over, and bounds what a peer can make us allocate.
MAX_CONTROL_BYTES = 4 << 20


class PacketKind(enum.IntFlag):
    """What a data packet carries."""

    RECORD = 1  # one whole record (seq 0); it ends its device, its checksum its digest
    CHUNK = 2   # the next piece of a stream
    END = 4     # end of the device's state, with its digest
    FIN = 8     # end of the channel: seq counts the packets before it
    RECORDS = 16  # several whole records (seq 0), each ends its device


class ChannelKind(enum.IntEnum):
    """Which channel a hello opens."""

    MAIN = 0
    DATA = 1


class ControlType(enum.IntEnum):
    """Main-channel messages, in the order a migration uses them."""

    HELLO = 1      # source -> dest: migration id, device table, channel count
    READY = 2      # dest -> source: device table accepted, devices ready to load
    LOADED = 3     # dest -> source: every device loaded and verified (phase one)
    COMMIT = 4     # source -> dest: source releases; resume there (phase two)
    RESUMED = 5    # dest -> source: VM running on the destination (the end of downtime)
    FAILED = 6     # either way: the migration failed, with the reason
    ABORT = 7      # source -> dest: discard what was loaded
    REPORT = 8     # dest -> source, after RESUMED: per-device results [and digests]
    HEARTBEAT = 9  # either way, during the save and load: this side and its workers answer


# flags -> kind without an enum call per packet (decoding runs per record: microseconds).
_KINDS = {int(k): k for k in (PacketKind.RECORD, PacketKind.CHUNK, PacketKind.END,
                             PacketKind.FIN, PacketKind.RECORDS)}


# The kinds that carry whole records: always seq 0.
_WHOLE = frozenset({PacketKind.RECORD, PacketKind.RECORDS})


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """A decoded data-packet header."""

    kind: PacketKind
    device: int
    seq: int
    length: int
    checksum: int


@dataclass(frozen=True, slots=True)
class EndOfState:
    """The payload of an END packet."""

    digest: bytes
    total_bytes: int
    packets: int


@dataclass(frozen=True, slots=True)
class Hello:
    """A channel hello."""

    kind: ChannelKind
    index: int
    channels: int
    migration_id: uuid.UUID
    tls: bool = False  # the source runs TLS next: a destination can refuse a mismatch at once


def _header_seed(header: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(header[:24])


def pack_packet_header(out: memoryview, kind: PacketKind, device: int, seq: int,
                       payload: memoryview | bytes) -> int:
    """Write the 32-byte header for ``payload`` into ``out[:32]``; return its checksum."""
    _PACKET.pack_into(out, 0, PACKET_MAGIC, VERSION, kind, device, seq, len(payload), 0, 0)
    checksum = xxhash.xxh3_64_intdigest(payload, seed=_header_seed(out))
    struct.pack_into("<Q", out, 24, checksum)
    return checksum


class StateDigest:
    """The END digest of one device: xxh3_128 over its packets' checksums, in order."""

    __slots__ = ("_hasher",)

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_128()

    def add(self, checksum: int) -> None:
        """Account for the next packet, by its (verified) checksum."""
        self._hasher.update(checksum.to_bytes(8, "little"))

    def digest(self) -> bytes:
        """The 16-byte digest so far."""
        return self._hasher.digest()


def decode_packet_header(data: memoryview | bytes, *, devices: int,
                         max_payload: int) -> PacketHeader:
    """Decode and bound-check a packet header; the payload is checked by :func:`verify_payload`."""
    if len(data) < PACKET_HEADER_BYTES:
        raise ProtocolError("packet.header", f"{len(data)} bytes, need {PACKET_HEADER_BYTES}")
    magic, version, flags, device, seq, length, reserved, checksum = _PACKET.unpack_from(data)
    if magic != PACKET_MAGIC:
        raise ProtocolError("packet.magic", f"{magic:#010x} is not {PACKET_MAGIC:#010x}")
    if version != VERSION:
        raise ProtocolError("packet.version", f"{version} is not supported (want {VERSION})")
    kind = _KINDS.get(flags)
    if kind is None:
        raise ProtocolError("packet.flags", f"{flags:#x} is not exactly one packet kind")
    if device >= devices:
        raise ProtocolError("packet.device", f"index {device} is not below {devices}")
    if reserved != 0:
        raise ProtocolError("packet.reserved", f"must be 0, got {reserved:#x}")
    if kind is PacketKind.END and length != END_PAYLOAD_BYTES:
        raise ProtocolError("packet.length", f"END payload is {END_PAYLOAD_BYTES}, got {length}")
    if kind in _WHOLE and seq != 0:
        raise ProtocolError("packet.seq", f"a {kind.name} is always seq 0, got {seq}")
    if length > max_payload:
        raise ProtocolError("packet.length", f"{length} exceeds the limit {max_payload}")
    if kind is PacketKind.FIN:
        if length or device:
            raise ProtocolError("packet.length", "a FIN carries no payload and device 0")
    elif kind is not PacketKind.END and length == 0:
        raise ProtocolError("packet.length", "a data packet must carry bytes")
    return PacketHeader(kind, device, seq, length, checksum)


def records_table_bytes(count: int) -> int:
    """Bytes before the first record of a RECORDS payload of ``count`` records."""
    return _RECORDS.size + (4 * count + 7) // 8 * 8


def pack_records_table(out: memoryview, devices: Sequence[int], length: int,
                       stride: int) -> int:
    """Write a RECORDS payload's table into ``out`` for ``devices``' records, each
    ``length`` bytes at ``stride`` after the table (written there by whoever got them);
    return the payload's length."""
    count = len(devices)
    table = records_table_bytes(count)
    _RECORDS.pack_into(out, 0, count, length, stride, 0)
    struct.pack_into(f"<{count}I", out, _RECORDS.size, *devices)
    out[_RECORDS.size + 4 * count:table] = bytes(table - _RECORDS.size - 4 * count)
    return table + count * stride


def decode_records(payload: memoryview, *, devices: int) -> list[tuple[int, memoryview]]:
    """A RECORDS payload's records as ``(device, record)``, views into ``payload``; strict
    like every decoder here (ProtocolError naming the field)."""
    if len(payload) < _RECORDS.size:
        raise ProtocolError("records.table", f"{len(payload)} bytes, need {_RECORDS.size}")
    count, length, stride, reserved = _RECORDS.unpack_from(payload)
    if reserved != 0:
        raise ProtocolError("records.reserved", f"must be 0, got {reserved:#x}")
    table = records_table_bytes(count)
    if count == 0 or table > len(payload):
        raise ProtocolError("records.count", f"{count} records in a payload of "
                                             f"{len(payload)} B")
    if not 0 < length <= stride:
        raise ProtocolError("records.length", f"records of {length} B at a stride of {stride}")
    if table + count * stride != len(payload):
        raise ProtocolError("records.stride", f"{count} records at a stride of {stride} B "
                            f"after a {table} B table are not the payload's {len(payload)} B")
    indices = struct.unpack_from(f"<{count}I", payload, _RECORDS.size)
    if max(indices) >= devices:
        raise ProtocolError("records.device", f"index {max(indices)} is not below {devices}")
    if len(set(indices)) != count:
        raise ProtocolError("records.device", "a device twice in one batch")
    return [(index, payload[table + i * stride:table + i * stride + length])
            for i, index in enumerate(indices)]


def verify_payload(header_bytes: memoryview | bytes, header: PacketHeader,
                   payload: memoryview | bytes) -> None:
    """Raise :class:`IntegrityError` unless the checksum covers this header and payload."""
    actual = xxhash.xxh3_64_intdigest(payload, seed=_header_seed(header_bytes))
    if actual != header.checksum:
        raise IntegrityError("packet.checksum", f"mismatch for device {header.device} seq "
                                                f"{header.seq} ({header.length} B)")


def pack_end(digest: bytes, total_bytes: int, packets: int) -> bytes:
    """The payload of an END packet."""
    return _END.pack(digest, total_bytes, packets, 0)


def decode_end(payload: memoryview | bytes) -> EndOfState:
    """Decode an END payload (its length was checked with the header)."""
    digest, total, packets, reserved = _END.unpack_from(payload)
    if reserved != 0:
        raise ProtocolError("end.reserved", f"must be 0, got {reserved:#x}")
    return EndOfState(bytes(digest), total, packets)


def pack_hello(hello: Hello) -> bytes:
    """Encode a channel hello."""
    return _HELLO.pack(HELLO_MAGIC, VERSION, hello.kind, hello.index, hello.channels,
                       HELLO_TLS if hello.tls else 0, hello.migration_id.bytes)


def decode_hello(data: bytes | bytearray | memoryview, *, max_channels: int = 1024) -> Hello:
    """Decode a channel hello, rejecting anything out of range."""
    if len(data) != HELLO_BYTES:
        raise ProtocolError("hello", f"{len(data)} bytes, need {HELLO_BYTES}")
    magic, version, kind, index, channels, flags, mid = _HELLO.unpack(data)
    if magic != HELLO_MAGIC:
        raise ProtocolError("hello.magic", f"{magic:#010x} is not {HELLO_MAGIC:#010x}")
    if version != VERSION:
        raise ProtocolError("hello.version", f"{version} is not supported (want {VERSION})")
    if kind not in (ChannelKind.MAIN, ChannelKind.DATA):
        raise ProtocolError("hello.kind", f"{kind} is not MAIN (0) or DATA (1)")
    if not 1 <= channels <= max_channels:
        raise ProtocolError("hello.channels", f"{channels} is not in 1..{max_channels}")
    if kind == ChannelKind.DATA and index >= channels:
        raise ProtocolError("hello.index", f"{index} is not below {channels}")
    if kind == ChannelKind.MAIN and index != 0:
        raise ProtocolError("hello.index", f"the main channel is index 0, got {index}")
    if flags & ~HELLO_TLS:
        raise ProtocolError("hello.flags", f"unknown flags {flags & ~HELLO_TLS:#x}")
    return Hello(ChannelKind(kind), index, channels, uuid.UUID(bytes=mid),
                 bool(flags & HELLO_TLS))


def pack_control(kind: ControlType, body: JsonObject) -> bytes:
    """Encode a control message."""
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError("control.length", f"{len(data)} exceeds {MAX_CONTROL_BYTES}")
    header = _CONTROL.pack(CONTROL_MAGIC, VERSION, kind, len(data), xxhash.xxh32_intdigest(data))
    return header + data


def decode_control_header(data: bytes | bytearray | memoryview) -> tuple[ControlType, int, int]:
    """Decode a control header: (type, body length, body checksum)."""
    if len(data) != CONTROL_HEADER_BYTES:
        raise ProtocolError("control.header", f"{len(data)} bytes, need {CONTROL_HEADER_BYTES}")
    magic, version, kind, length, checksum = _CONTROL.unpack(data)
    if magic != CONTROL_MAGIC:
        raise ProtocolError("control.magic", f"{magic:#010x} is not {CONTROL_MAGIC:#010x}")
    if version != VERSION:
        raise ProtocolError("control.version", f"{version} is not supported (want {VERSION})")
    try:
        ctype = ControlType(kind)
    except ValueError:
        raise ProtocolError("control.type", f"unknown message type {kind}") from None
    if length > MAX_CONTROL_BYTES:
        raise ProtocolError("control.length", f"{length} exceeds {MAX_CONTROL_BYTES}")
    return ctype, length, checksum


def decode_control_body(data: bytes | bytearray | memoryview, checksum: int) -> JsonObject:
    """Check and parse a control body into a JSON object."""
    if xxhash.xxh32_intdigest(data) != checksum:
        raise IntegrityError("control.checksum", "mismatch")
    try:
        body = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("control.body", f"not UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("control.body", "must be a JSON object")
    return body


def field(body: JsonObject, name: str, kind: type[F]) -> F:
    """Fetch a required field of a control body with its type checked."""
    if name not in body:
        raise ProtocolError(f"control.{name}", "is missing")
    value = body[name]
    # bool is an int to isinstance: accept it only where bool is asked for.
    if isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"control.{name}", "has the wrong type bool")
    if not isinstance(value, kind):
        raise ProtocolError(f"control.{name}", f"has the wrong type {type(value).__name__}")
    return value
