"""Wire formats: round trips, and every malformed input rejected with ProtocolError."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstate.errors import IntegrityError, ProtocolError
from devstate.protocol import wire

HDR = wire.PACKET_HEADER_BYTES
MAX = 1 << 20


def _packet(kind: wire.PacketKind, device: int, seq: int, payload: bytes) -> bytearray:
    buf = bytearray(HDR + len(payload))
    view = memoryview(buf)
    view[HDR:] = payload
    wire.pack_packet_header(view, kind, device, seq, view[HDR:])
    return buf


def _check(buf: bytes | bytearray, devices: int = 8) -> wire.PacketHeader:
    header = wire.decode_packet_header(buf[:HDR], devices=devices, max_payload=MAX)
    wire.verify_payload(buf[:HDR], header, buf[HDR:HDR + header.length])
    if header.length != len(buf) - HDR:
        raise ProtocolError("packet.length", "does not match the bytes that followed")
    return header


@given(device=st.integers(0, 7), seq=st.integers(0, 2**32 - 1),
       payload=st.binary(min_size=1, max_size=4096))
def test_chunk_round_trip(device: int, seq: int, payload: bytes) -> None:
    header = _check(_packet(wire.PacketKind.CHUNK, device, seq, payload))
    assert (header.kind, header.device, header.seq, header.length) == (
        wire.PacketKind.CHUNK, device, seq, len(payload))


@settings(max_examples=300)
@given(payload=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_single_bit_flip_is_rejected(payload: bytes, data: st.DataObject) -> None:
    buf = _packet(wire.PacketKind.CHUNK, 3, 17, payload)
    bit = data.draw(st.integers(0, len(buf) * 8 - 1))
    buf[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError):
        _check(buf)


@settings(max_examples=500)
@given(raw=st.binary(min_size=0, max_size=64))
def test_arbitrary_header_bytes_raise_only_protocol_error(raw: bytes) -> None:
    try:
        header = wire.decode_packet_header(raw, devices=8, max_payload=MAX)
    except ProtocolError:
        return
    assert header.device < 8 and header.length <= MAX


@given(field=st.sampled_from(["magic", "version", "flags", "device", "reserved", "length"]),
       value=st.integers(0, 2**16 - 1))
def test_each_header_field_is_checked(field: str, value: int) -> None:
    import struct

    offsets = {"magic": ("<I", 0), "version": ("<H", 4), "flags": ("<H", 6),
               "device": ("<I", 8), "reserved": ("<I", 20), "length": ("<I", 16)}
    fmt, off = offsets[field]
    buf = _packet(wire.PacketKind.CHUNK, 1, 0, b"x" * 16)
    original = struct.unpack_from(fmt, buf, off)[0]
    bad = {"magic": value | 1 << 20, "version": (value % 60000) + 2,
           "flags": 3 if value % 2 else 32,
           "device": 8 + value, "reserved": value + 1, "length": MAX + 1 + value}[field]
    assert bad != original
    struct.pack_into(fmt, buf, off, bad)
    with pytest.raises(ProtocolError) as info:
        wire.decode_packet_header(buf[:HDR], devices=8, max_payload=MAX)
    assert info.value.field == f"packet.{field}"


def test_fin_carries_no_payload_and_device_0() -> None:
    header = wire.decode_packet_header(_packet(wire.PacketKind.FIN, 0, 7, b"")[:HDR],
                                       devices=1, max_payload=MAX)
    assert (header.kind, header.seq, header.length) == (wire.PacketKind.FIN, 7, 0)
    for device, payload in ((0, b"x"), (1, b"")):
        with pytest.raises(ProtocolError, match="FIN"):
            wire.decode_packet_header(_packet(wire.PacketKind.FIN, device, 0, payload)[:HDR],
                                      devices=2, max_payload=MAX)


def test_record_and_end_rules() -> None:
    with pytest.raises(ProtocolError, match="seq"):
        wire.decode_packet_header(_packet(wire.PacketKind.RECORD, 0, 1, b"r")[:HDR],
                                  devices=1, max_payload=MAX)
    with pytest.raises(ProtocolError, match="END payload"):
        wire.decode_packet_header(_packet(wire.PacketKind.END, 0, 1, b"short")[:HDR],
                                  devices=1, max_payload=MAX)
    end = wire.pack_end(b"d" * 16, 1234, 5)
    header = _check(_packet(wire.PacketKind.END, 0, 5, end), devices=1)
    assert header.kind is wire.PacketKind.END
    assert wire.decode_end(end) == wire.EndOfState(b"d" * 16, 1234, 5)


def _records(devices: list[int], records: list[bytes], stride: int) -> bytearray:
    """A RECORDS payload, its table written after the records, as the source does."""
    table = wire.records_table_bytes(len(devices))
    out = bytearray(table + len(devices) * stride)
    for k, record in enumerate(records):
        out[table + k * stride:table + k * stride + len(record)] = record
    assert wire.pack_records_table(memoryview(out), devices, len(records[0]), stride) == len(out)
    return out


@given(data=st.data(), count=st.integers(1, 16), length=st.integers(1, 200),
       pad=st.integers(0, 9))
def test_records_round_trip(data: st.DataObject, count: int, length: int, pad: int) -> None:
    devices = data.draw(st.lists(st.integers(0, 999), min_size=count, max_size=count,
                                 unique=True))
    records = [data.draw(st.binary(min_size=length, max_size=length)) for _ in devices]
    payload = _records(devices, records, length + pad)
    got = wire.decode_records(memoryview(payload), devices=1000)
    assert [(d, bytes(r)) for d, r in got] == list(zip(devices, records, strict=True))
    header = _check(_packet(wire.PacketKind.RECORDS, devices[0], 0, bytes(payload)),
                    devices=1000)
    assert header.kind is wire.PacketKind.RECORDS


def test_records_table_rules() -> None:
    """Each malformed table is refused naming its field, before any record is taken."""
    good = _records([3, 5], [b"a" * 10, b"b" * 10], 16)

    def refused(payload: bytes | bytearray, field: str, devices: int = 8) -> None:
        with pytest.raises(ProtocolError) as info:
            wire.decode_records(memoryview(bytearray(payload)), devices=devices)
        assert info.value.field == field

    def table(count: int, length: int, stride: int, reserved: int = 0) -> bytearray:
        out = bytearray(good)
        out[:16] = b"".join(v.to_bytes(4, "little") for v in (count, length, stride, reserved))
        return out

    refused(good[:15], "records.table")
    refused(table(2, 10, 16, reserved=1), "records.reserved")
    refused(table(0, 10, 16), "records.count")
    refused(table(2**32 - 1, 10, 16), "records.count")  # a table longer than the payload
    refused(table(2, 0, 16), "records.length")
    refused(table(2, 17, 16), "records.length")  # a record longer than its stride
    refused(table(2, 10, 15), "records.stride")  # the records do not fill the payload
    refused(good + b"x", "records.stride")
    refused(good, "records.device", devices=5)
    refused(_records([4, 4], [b"a", b"b"], 8), "records.device")
    with pytest.raises(ProtocolError, match="seq"):
        wire.decode_packet_header(_packet(wire.PacketKind.RECORDS, 0, 1, bytes(good))[:HDR],
                                  devices=8, max_payload=MAX)


@given(raw=st.binary(max_size=200))
def test_arbitrary_records_bytes_raise_only_protocol_error(raw: bytes) -> None:
    try:
        wire.decode_records(memoryview(raw), devices=8)
    except ProtocolError:
        pass


def test_checksum_mismatch_is_an_integrity_error() -> None:
    buf = _packet(wire.PacketKind.CHUNK, 0, 0, b"payload")
    buf[-1] ^= 0xFF
    with pytest.raises(IntegrityError) as info:
        _check(buf)
    assert info.value.field == "packet.checksum"


@given(kind=st.sampled_from(list(wire.ChannelKind)), channels=st.integers(1, 1024),
       data=st.data())
def test_hello_round_trip(kind: wire.ChannelKind, channels: int, data: st.DataObject) -> None:
    index = 0 if kind is wire.ChannelKind.MAIN else data.draw(st.integers(0, channels - 1))
    hello = wire.Hello(kind, index, channels, uuid.uuid4())
    assert wire.decode_hello(wire.pack_hello(hello)) == hello


@settings(max_examples=500)
@given(raw=st.binary(min_size=0, max_size=64))
def test_arbitrary_hello_bytes_raise_only_protocol_error(raw: bytes) -> None:
    try:
        hello = wire.decode_hello(raw)
    except ProtocolError:
        return
    assert hello.channels >= 1


@settings(max_examples=300)
@given(data=st.data())
def test_corrupted_hello_fields_are_rejected(data: st.DataObject) -> None:
    good = bytearray(wire.pack_hello(wire.Hello(wire.ChannelKind.DATA, 2, 4, uuid.uuid4())))
    # magic, version, kind, index (2 -> >= channels), channels (0), an unknown flag
    pos, value = data.draw(st.sampled_from([(0, 0x00), (4, 0x09), (6, 0x05), (8, 0x07),
                                            (10, 0x00), (12, 0x02)]))
    good[pos] = value
    if pos == 10:
        good[11] = 0
    with pytest.raises(ProtocolError):
        wire.decode_hello(bytes(good))


@given(body=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8),
                            max_size=5),
       kind=st.sampled_from(list(wire.ControlType)))
def test_control_round_trip(body: dict[str, object], kind: wire.ControlType) -> None:
    raw = wire.pack_control(kind, body)
    ctype, length, checksum = wire.decode_control_header(raw[:wire.CONTROL_HEADER_BYTES])
    assert ctype is kind
    assert wire.decode_control_body(raw[wire.CONTROL_HEADER_BYTES:], checksum) == body
    assert length == len(raw) - wire.CONTROL_HEADER_BYTES


@settings(max_examples=500)
@given(header=st.binary(min_size=16, max_size=16), body=st.binary(max_size=64))
def test_arbitrary_control_bytes_raise_only_protocol_error(header: bytes, body: bytes) -> None:
    try:
        _, _, checksum = wire.decode_control_header(header)
        wire.decode_control_body(body, checksum)
    except ProtocolError:
        pass


def test_control_bounds_and_shapes() -> None:
    import struct

    huge = struct.pack("<IHHII", wire.CONTROL_MAGIC, wire.VERSION, 1,
                       wire.MAX_CONTROL_BYTES + 1, 0)
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode_control_header(huge)
    import xxhash

    for body in (b"[1, 2]", b"\xff\xfe", b"{"):
        with pytest.raises(ProtocolError, match="control.body"):
            wire.decode_control_body(body, xxhash.xxh32_intdigest(body))
    with pytest.raises(ProtocolError, match="control.n"):
        wire.field({"n": "3"}, "n", int)
    with pytest.raises(ProtocolError, match="is missing"):
        wire.field({}, "n", int)
    with pytest.raises(ProtocolError, match="wrong type bool"):
        wire.field({"n": True}, "n", int)
