"""Measuring server and clients that tests/test_netns.py runs inside the namespaces.

Stdlib only, run as ``python netns_probe.py COMMAND ...``:

* ``serve HOST``: listen on an ephemeral port, print ``ready PORT``, then on every
  connection read an 8-byte big-endian length and that many bytes, and answer ``k``.
* ``send HOST PORT FLOWS BYTES``: open FLOWS connections first, then send BYTES on each
  at once, wait for every ``k``, and print JSON ``{"seconds": ..., "ports": [...]}``.
  The clock runs from the first byte to the last answer, so the slow start of every flow
  is in the measurement: a rate read from it errs low, never high.
* ``ping HOST PORT COUNT [--dontroute]``: COUNT times, connect and time it, then send an
  empty request and time the answer; print JSON ``{"connect": [...], "echo": [...]}``.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

_HEADER = struct.Struct("!Q")
_CHUNK = 1 << 20


def recv_exactly(conn: socket.socket, size: int) -> None:
    """Read and drop ``size`` bytes."""
    while size:
        data = conn.recv(min(size, _CHUNK))
        if not data:
            raise ConnectionError(f"peer closed with {size} bytes to come")
        size -= len(data)


def answer(conn: socket.socket) -> None:
    """Serve one connection: a request of any length, an answer of one byte."""
    with conn:
        header = conn.recv(_HEADER.size, socket.MSG_WAITALL)
        if len(header) == _HEADER.size:
            recv_exactly(conn, _HEADER.unpack(header)[0])
            conn.sendall(b"k")


def serve(host: str) -> None:
    server = socket.create_server((host, 0))
    print(f"ready {server.getsockname()[1]}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def request(conn: socket.socket, size: int) -> None:
    """Send a request of ``size`` bytes and wait for its answer."""
    conn.sendall(_HEADER.pack(size))
    chunk = bytes(_CHUNK)
    view = memoryview(chunk)
    left = size
    while left:
        left -= conn.send(view[: min(left, _CHUNK)])
    if conn.recv(1) != b"k":
        raise ConnectionError("no answer")


def send(host: str, port: int, flows: int, size: int) -> None:
    conns = [socket.create_connection((host, port)) for _ in range(flows)]
    threads = [threading.Thread(target=request, args=(conn, size)) for conn in conns]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - start
    ports = [conn.getsockname()[1] for conn in conns]
    for conn in conns:
        conn.close()
    print(json.dumps({"seconds": seconds, "ports": ports}))


def ping(host: str, port: int, count: int, dontroute: bool) -> None:
    result: dict[str, list[float]] = {"connect": [], "echo": []}
    for _ in range(count):
        with socket.socket() as conn:
            if dontroute:
                # Only a host on a directly attached link is reachable: nothing is sent
                # towards a gateway.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_DONTROUTE, 1)
            start = time.monotonic()
            conn.connect((host, port))
            result["connect"].append(time.monotonic() - start)
            start = time.monotonic()
            request(conn, 0)
            result["echo"].append(time.monotonic() - start)
    print(json.dumps(result))


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "serve":
        serve(args[0])
    elif command == "send":
        send(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif command == "ping":
        ping(args[0], int(args[1]), int(args[2]), "--dontroute" in args[3:])
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
