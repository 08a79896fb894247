"""``sim-vcpu``: an x86-shaped vCPU whose get and put cost what KVM's do.

The state has the sections a VMM migrates per vCPU, with KVM's sizes
(shared/reference/kvm-vcpu-state.md): MP state 4 B, regs 144 B, sregs 312 B, XSAVE 4096 B,
XCRs 392 B, debug regs 128 B, LAPIC 1024 B, an MSR list of 40 entries (8 + 16 x 40 B) and
vCPU events 64 B: 6.8 KB. A source vCPU's contents are deterministic and distinct per vCPU
(seeded by the machine seed and the vCPU id); an incoming vCPU starts blank, as a freshly
created one would.

Cost: a real KVM get of all sections took ~45 us on this machine kind. :meth:`SimVcpu.get`
and :meth:`SimVcpu.put` copy every section and then keep the CPU busy until the calling
thread has consumed the spec's ``get_us``/``put_us`` of CPU time since the call began. That
is work, not a sleep, and it is measured in CPU time, not wall time, so a get costs the same
whether or not its core is shared: scaling across worker processes is measured, not
assumed.

Record layout (little-endian)::

    header   magic u32 'VCPU' | version u16 | sections u16 | vcpu id u32 | reserved u32
    section  tag u16 | reserved u16 | length u32 | bytes[length]     (x 9, in SAVE_ORDER)
"""

from __future__ import annotations

import struct
import time

import numpy as np
import xxhash

from devstate.config.spec import DeviceSpec
from devstate.devices.base import RecordDevice

# One record layout and one ordering for simulated and real vCPUs: the KVM backend's,
# with its reasons (sim-vcpu uses SREGS, never SREGS2).
from devstate.devices.kvm.record import HEADER as _HEADER
from devstate.devices.kvm.record import RESTORE_ORDER, SAVE_ORDER, Section
from devstate.devices.kvm.record import SECTION as _SECTION
from devstate.errors import DeviceError

MAGIC = 0x55504356  # b"VCPU" little-endian
VERSION = 1
MSR_COUNT = 40


SECTION_BYTES: dict[Section, int] = {
    Section.MP_STATE: 4,
    Section.REGS: 144,
    Section.SREGS: 312,
    Section.XSAVE: 4096,
    Section.XCRS: 392,
    Section.DEBUGREGS: 128,
    Section.LAPIC: 1024,
    Section.MSRS: 8 + 16 * MSR_COUNT,
    Section.VCPU_EVENTS: 64,
}

RECORD_BYTES = _HEADER.size + sum(_SECTION.size + n for n in SECTION_BYTES.values())


def _busy_until(deadline_ns: int) -> None:
    # Burn CPU until this thread has *consumed* the budget: CPU time, not wall time, so a
    # get costs the same work whether or not the core is shared with another process.
    while time.thread_time_ns() < deadline_ns:
        pass


def _layout() -> tuple[dict[Section, int], list[int]]:
    """Where each section's bytes and each section header sit in a record."""
    offsets: dict[Section, int] = {}
    headers: list[int] = []
    pos = _HEADER.size
    for section in SAVE_ORDER:
        headers.append(pos)
        offsets[section] = pos + _SECTION.size
        pos += _SECTION.size + SECTION_BYTES[section]
    return offsets, headers


SECTION_OFFSETS, _HEADER_OFFSETS = _layout()


class SimVcpu(RecordDevice):
    """One simulated vCPU, held by its owner worker. Runs in: the owning worker process.

    The state is kept as a record image (header, then each section behind its header, in
    SAVE_ORDER), so a get is one copy out and a put checks the image's fixed skeleton
    and copies each section in RESTORE_ORDER; the ioctl-sized cost is the CPU burn.
    """

    def __init__(self, spec: DeviceSpec, machine_seed: int, *, incoming: bool = False) -> None:
        super().__init__(spec, machine_seed)
        assert spec.vcpu is not None
        self.vcpu_id = int(spec.id.split("/", 1)[1])
        self._get_ns = int(spec.vcpu.get_us * 1000)
        self._put_ns = int(spec.vcpu.put_us * 1000)
        self._image = bytearray(RECORD_BYTES)
        _HEADER.pack_into(self._image, 0, MAGIC, VERSION, len(SAVE_ORDER), self.vcpu_id, 0)
        for section, header in zip(SAVE_ORDER, _HEADER_OFFSETS, strict=True):
            _SECTION.pack_into(self._image, header, section, 0, SECTION_BYTES[section])
        self._skeleton = [bytes(self._image[:_HEADER.size])] + [
            bytes(self._image[h:h + _SECTION.size]) for h in _HEADER_OFFSETS]
        if not incoming:
            self._seed()

    def _section(self, section: Section) -> memoryview:
        start = SECTION_OFFSETS[section]
        return memoryview(self._image)[start:start + SECTION_BYTES[section]]

    def _seed(self) -> None:
        rng = np.random.default_rng([self.machine_seed, self.vcpu_id])
        for section in SAVE_ORDER:
            self._section(section)[:] = rng.bytes(SECTION_BYTES[section])
        # Keep the few fields with a meaning plausible: MP state RUNNABLE or HALTED, the
        # MSR list header counting its entries, the LAPIC ID register (offset 0x20) holding
        # the vCPU id in bits 24-31 as x86 does.
        struct.pack_into("<I", self._section(Section.MP_STATE), 0,
                         0 if self.vcpu_id == 0 else 3)
        struct.pack_into("<II", self._section(Section.MSRS), 0, MSR_COUNT, 0)
        struct.pack_into("<I", self._section(Section.LAPIC), 0x20, (self.vcpu_id & 0xFF) << 24)

    async def digest(self) -> bytes:
        """xxh3_128 of the state (the record image)."""
        return xxhash.xxh3_128_digest(self._image)

    def get(self, out: memoryview) -> int:
        """Write the record into ``out`` (sections in SAVE_ORDER); costs ``get_us`` of CPU."""
        deadline = time.thread_time_ns() + self._get_ns
        if len(out) < RECORD_BYTES:
            raise DeviceError(self.id, f"get: buffer of {len(out)} B < record {RECORD_BYTES} B")
        out[:RECORD_BYTES] = self._image
        _busy_until(deadline)
        return RECORD_BYTES

    def put(self, data: memoryview) -> None:
        """Validate a record and load it, section by section in RESTORE_ORDER."""
        deadline = time.thread_time_ns() + self._put_ns
        if not self._fits_skeleton(data):
            self._parse(data)  # names what is wrong
            raise DeviceError(self.id, "put: record does not match the vCPU's layout")
        for section in RESTORE_ORDER:
            start = SECTION_OFFSETS[section]
            self._image[start:start + SECTION_BYTES[section]] = \
                data[start:start + SECTION_BYTES[section]]
        _busy_until(deadline)

    def _fits_skeleton(self, data: memoryview) -> bool:
        if len(data) != RECORD_BYTES or data[:_HEADER.size] != self._skeleton[0]:
            return False
        return all(data[h:h + _SECTION.size] == skeleton
                   for h, skeleton in zip(_HEADER_OFFSETS, self._skeleton[1:], strict=True))

    def _parse(self, data: memoryview) -> None:
        """Raise the DeviceError that says how ``data`` is not a record of this vCPU."""
        if len(data) < _HEADER.size:
            raise DeviceError(self.id, f"put: record of {len(data)} B is shorter than a header")
        magic, version, count, vcpu_id, _ = _HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise DeviceError(self.id, f"put: bad record magic {magic:#x}")
        if version != VERSION:
            raise DeviceError(self.id, f"put: record version {version} is not {VERSION}")
        if vcpu_id != self.vcpu_id:
            raise DeviceError(self.id, f"put: record is for vCPU {vcpu_id}")
        if count != len(SAVE_ORDER):
            raise DeviceError(self.id, f"put: record has {count} sections, not {len(SAVE_ORDER)}")
        pos = _HEADER.size
        for expected in SAVE_ORDER:
            if pos + _SECTION.size > len(data):
                raise DeviceError(self.id, f"put: record truncated before {expected.name}")
            tag, _, length = _SECTION.unpack_from(data, pos)
            pos += _SECTION.size
            if tag != expected or length != SECTION_BYTES[expected]:
                raise DeviceError(self.id, f"put: section {tag} of {length} B where "
                                           f"{expected.name} of {SECTION_BYTES[expected]} B "
                                           "belongs")
            if pos + length > len(data):
                raise DeviceError(self.id, f"put: record truncated inside {expected.name}")
            pos += length
        if pos != len(data):
            raise DeviceError(self.id, f"put: {len(data) - pos} B after the last section")
