"""What the wire format costs: checksum throughput, and a channel's packets against a raw
socket sending the same bytes.

* ``checksum``: xxh3-64 over 64 MiB in 1 MiB payloads (what every packet costs each side,
  :func:`devstate.protocol.wire.pack_packet_header` /
  :func:`~devstate.protocol.wire.verify_payload`) against a plain memory copy of the same bytes.
* ``channel``: 256 MiB from this process to a receiver process over a Unix stream socket,
  ``raw`` (``sendall`` of 1 MiB pieces, the receiver ``recv_into`` a buffer) against
  ``packets`` (each 1 MiB payload behind its 32-byte header with its checksum, sent with
  one ``sendmsg``; the receiver decodes and bound-checks each header, receives the payload
  into place and verifies its checksum): the framing and integrity a devstate channel adds
  on top of the socket, both sides, in one run.

Run: ``python -m pytest benches/test_bench_wire.py --benchmark-only`` (about 20 s).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from typing import Any

import numpy as np
import pytest

from benches.conftest import median_s
from devstate.protocol import wire

PAYLOAD = 1 << 20
CHECKSUM_BYTES = 64 << 20
CHANNEL_BYTES = 256 << 20
QUICK_BYTES = 16 << 20
HDR = wire.PACKET_HEADER_BYTES


@pytest.fixture(scope="module")
def state() -> np.ndarray:
    """64 MiB of state, touched (first touch would be measured otherwise)."""
    return np.random.default_rng(3).integers(0, 255, CHECKSUM_BYTES, dtype=np.uint8)


def _checksum_all(data: memoryview) -> None:
    """What a sender does per packet: its header and checksum (wire.pack_packet_header)."""
    header = memoryview(bytearray(HDR))
    for seq, start in enumerate(range(0, len(data), PAYLOAD)):
        wire.pack_packet_header(header, wire.PacketKind.CHUNK, 0, seq,
                                data[start:start + PAYLOAD])


@pytest.mark.benchmark(group="checksum")
def test_plain_copy(benchmark, results, state: np.ndarray) -> None:
    target = np.empty_like(state)
    target[:] = 0
    benchmark(np.copyto, target, state)
    results.setdefault("checksum", {})["copy"] = median_s(benchmark) or 0.0
    _rate(benchmark, CHECKSUM_BYTES)


@pytest.mark.benchmark(group="checksum")
def test_xxh3_checksum(benchmark, results, state: np.ndarray) -> None:
    benchmark(_checksum_all, memoryview(state))
    _rate(benchmark, CHECKSUM_BYTES)
    copy, median = results.get("checksum", {}).get("copy"), median_s(benchmark)
    if copy and median:
        benchmark.extra_info["checksum_time_over_copy"] = round(median / copy, 3)


def _rate(benchmark, size: int) -> None:
    median = median_s(benchmark)
    if median:
        benchmark.extra_info["GB/s"] = round(size / median / 1e9, 2)


def _receive(sock: socket.socket, size: int, framed: bool) -> None:
    """The receiver process: take ``size`` payload bytes, raw or as verified packets."""
    buffer = memoryview(bytearray(PAYLOAD + HDR))
    received = 0
    with sock:
        sock.sendall(b"r")  # started: the sender's clock may run now
        while received < size:
            if not framed:
                n = sock.recv_into(buffer[:PAYLOAD])
                if n == 0:
                    raise EOFError("the sender hung up early")
                received += n
                continue
            _recv_exactly(sock, buffer[:HDR])
            header = wire.decode_packet_header(buffer[:HDR], devices=1, max_payload=PAYLOAD)
            payload = buffer[HDR:HDR + header.length]
            _recv_exactly(sock, payload)
            wire.verify_payload(buffer[:HDR], header, payload)
            received += header.length
        sock.sendall(b"k")  # all in, all verified


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise EOFError("the sender hung up mid-packet")
        view = view[n:]


def _send(sock: socket.socket, data: memoryview, framed: bool) -> None:
    header = memoryview(bytearray(HDR))
    for seq, start in enumerate(range(0, len(data), PAYLOAD)):
        payload = data[start:start + PAYLOAD]
        if not framed:
            sock.sendall(payload)
            continue
        wire.pack_packet_header(header, wire.PacketKind.CHUNK, 0, seq, payload)
        parts = [header, payload]
        while parts:  # one sendmsg per packet, unless the socket takes it in pieces
            sent = sock.sendmsg(parts)
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if parts:
                parts[0] = parts[0][sent:]
    assert sock.recv(1) == b"k"


@pytest.mark.benchmark(group="channel")
@pytest.mark.parametrize("mode", ["raw", "packets"])
def test_channel_vs_raw_socket(benchmark, results, state: np.ndarray, mode: str) -> None:
    size = QUICK_BYTES if benchmark.disabled else CHANNEL_BYTES
    # The same 64 MiB of state, four times over: no allocation inside the timing.
    data = memoryview(np.tile(state, -(-size // CHECKSUM_BYTES))[:size])
    framed = mode == "packets"
    ctx = mp.get_context("forkserver")

    def start() -> tuple[tuple[socket.socket, Any], dict[str, Any]]:
        # Outside the timing: the receiver process starts and says so.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        receiver = ctx.Process(target=_receive, args=(theirs, size, framed))
        receiver.start()
        theirs.close()
        assert ours.recv(1) == b"r"
        return (ours, receiver), {}

    def transfer(ours: socket.socket, receiver: Any) -> None:
        _send(ours, data, framed)  # ends when the receiver says all is in and verified

    def finish(ours: socket.socket, receiver: Any) -> None:
        # Outside the timing: the receiver's exit is the same cost in both modes.
        ours.close()
        receiver.join(30)
        if receiver.is_alive():
            receiver.kill()
            receiver.join()
        assert receiver.exitcode == 0, "the receiver failed"

    benchmark.pedantic(transfer, setup=start, teardown=finish,
                       rounds=1 if benchmark.disabled else 5, iterations=1)
    _rate(benchmark, size)
    seen = results.setdefault("channel", {})
    seen[mode] = median_s(benchmark) or 0.0
    if framed and seen.get("raw") and seen[mode]:
        benchmark.extra_info["packets_time_over_raw"] = round(seen[mode] / seen["raw"], 3)
