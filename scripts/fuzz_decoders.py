#!/usr/bin/env python3
"""Coverage-guided fuzzing of every decoder of untrusted input, with atheris (libFuzzer).

Targets: ``packet`` (a data-packet header and its payload's checksum), ``hello`` (a
channel hello), ``control`` (a main-channel control message), ``qmp`` (QMP's JSON stream
framing), ``spec`` (a machine spec as JSON). Each decoder may only return, or raise the
error it documents (ProtocolError, SpecError); anything else is a crash libFuzzer reports
with its input. Hypothesis tests cover the same decoders by property
(tests/test_wire.py, tests/test_qmp_server.py, tests/test_spec.py); this run lets coverage
steer the inputs instead.

Usage: ``python scripts/fuzz_decoders.py TARGET [libFuzzer flags]``, e.g.
``python scripts/fuzz_decoders.py packet -runs=200000`` or ``-max_total_time=60``. A
directory after the target is libFuzzer's corpus: tests/test_fuzz_decoders.py seeds the
spec target's with the hostile specs of tests/test_hostile_specs.py.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

with atheris.instrument_imports():
    from devstate.config.spec import decode_spec
    from devstate.errors import ProtocolError, SpecError
    from devstate.protocol import wire
    from devstate.qmp.json_stream import JsonStream


def packet(data: bytes) -> None:
    header = data[:wire.PACKET_HEADER_BYTES]
    try:
        decoded = wire.decode_packet_header(header, devices=64, max_payload=1 << 20)
        wire.verify_payload(header, decoded, data[wire.PACKET_HEADER_BYTES:])
    except ProtocolError:  # IntegrityError included
        pass


def hello(data: bytes) -> None:
    try:
        wire.decode_hello(data)
    except ProtocolError:
        pass


def control(data: bytes) -> None:
    try:
        head = wire.CONTROL_HEADER_BYTES
        _, length, checksum = wire.decode_control_header(data[:head])
        wire.decode_control_body(data[head:head + length], checksum)
    except ProtocolError:
        pass


def qmp(data: bytes) -> None:
    stream = JsonStream()
    cut = len(data) // 2  # two reads: framing across a split is what most often breaks
    stream.feed(data[:cut])
    stream.feed(data[cut:])


def spec(data: bytes) -> None:
    try:  # JSON syntax, nesting and number errors must be SpecErrors too
        decode_spec(data, json_format=True)
    except SpecError:
        pass


TARGETS = {f.__name__: f for f in (packet, hello, control, qmp, spec)}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
