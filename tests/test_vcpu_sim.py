"""sim-vcpu: distinct seeded state, strict record validation, ordering as data, real cost."""

from __future__ import annotations

import struct
import time

import pytest

from devstate.config.spec import parse_spec
from devstate.devices import device_table
from devstate.devices.vcpu_sim import (
    RECORD_BYTES,
    RESTORE_ORDER,
    SAVE_ORDER,
    SECTION_BYTES,
    Section,
    SimVcpu,
)
from devstate.errors import DeviceError


def _vcpus(n: int = 4, **costs: float) -> list:
    spec = parse_spec({"seed": 9, "vcpus": {"count": n, **costs}})
    return list(device_table(spec))


def test_state_is_distinct_per_vcpu_and_deterministic(run) -> None:
    table = _vcpus()
    digests = {run(SimVcpu(d, 9).digest()) for d in table}
    assert len(digests) == len(table)
    assert run(SimVcpu(table[1], 9).digest()) == run(SimVcpu(table[1], 9).digest())
    assert run(SimVcpu(table[1], 10).digest()) != run(SimVcpu(table[1], 9).digest())


def test_round_trip_into_a_blank_vcpu(run) -> None:
    table = _vcpus()
    source, dest = SimVcpu(table[2], 9), SimVcpu(table[2], 9, incoming=True)
    assert run(dest.digest()) != run(source.digest())
    buf = memoryview(bytearray(RECORD_BYTES))
    n = source.get(buf)
    assert n == RECORD_BYTES and 6_000 < n < 7_500  # the ~6-7 KB a VMM migrates
    dest.put(buf[:n])
    assert run(dest.digest()) == run(source.digest())


def test_record_carries_lapic_id_and_sections_in_save_order() -> None:
    vcpu = SimVcpu(_vcpus()[3], 9)
    buf = memoryview(bytearray(RECORD_BYTES))
    vcpu.get(buf)
    pos, tags = 16, []
    for _ in SAVE_ORDER:
        tag, _, length = struct.unpack_from("<HHI", buf, pos)
        tags.append(Section(tag))
        if tag == Section.LAPIC:
            assert struct.unpack_from("<I", buf, pos + 8 + 0x20)[0] >> 24 == 3
        pos += 8 + length
    assert tuple(tags) == SAVE_ORDER


def test_ordering_constraints_hold() -> None:
    def before(order: tuple[Section, ...], a: Section, b: Section) -> bool:
        return order.index(a) < order.index(b)

    assert SAVE_ORDER[0] is Section.MP_STATE and SAVE_ORDER[-1] is Section.VCPU_EVENTS
    assert before(RESTORE_ORDER, Section.REGS, Section.VCPU_EVENTS)
    assert before(RESTORE_ORDER, Section.SREGS, Section.LAPIC)
    assert before(RESTORE_ORDER, Section.LAPIC, Section.MSRS)
    assert set(SAVE_ORDER) == set(RESTORE_ORDER) == set(SECTION_BYTES)


@pytest.mark.parametrize(("offset", "value", "message"), [
    (0, 0, "bad record magic"), (4, 9, "version"), (8, 2, "for vCPU 2"),
    (6, 3, "3 sections"), (16, 2, "section 2"), (20, 5, "section 1 of 5 B")])
def test_put_rejects_malformed_records(offset: int, value: int, message: str) -> None:
    table = _vcpus()
    buf = memoryview(bytearray(RECORD_BYTES))
    n = SimVcpu(table[1], 9).get(buf)
    fmt = "<H" if offset in (4, 6, 16) else "<I"
    struct.pack_into(fmt, buf, offset, value)
    with pytest.raises(DeviceError, match=message):
        SimVcpu(table[1], 9, incoming=True).put(buf[:n])


def test_put_rejects_truncated_and_padded_records() -> None:
    table = _vcpus()
    buf = memoryview(bytearray(RECORD_BYTES + 8))
    n = SimVcpu(table[0], 9).get(buf)
    dest = SimVcpu(table[0], 9, incoming=True)
    for bad, message in ((buf[:10], "shorter than a header"), (buf[:n - 1], "truncated"),
                         (buf[:n + 8], "after the last section")):
        with pytest.raises(DeviceError, match=message):
            dest.put(bad)


def test_get_and_put_cost_cpu_time_not_sleep() -> None:
    vcpu = SimVcpu(_vcpus(2, get_us=200.0, put_us=300.0)[1], 9)
    buf = memoryview(bytearray(RECORD_BYTES))
    cpu0 = time.thread_time_ns()
    for _ in range(20):
        n = vcpu.get(buf)
    cpu1 = time.thread_time_ns()
    for _ in range(20):
        vcpu.put(buf[:n])
    cpu2 = time.thread_time_ns()
    assert (cpu1 - cpu0) / 20 >= 200_000
    assert (cpu2 - cpu1) / 20 >= 300_000
