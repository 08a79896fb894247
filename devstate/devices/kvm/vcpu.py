"""``kvm`` vCPUs: one real KVM vCPU's state as a record, got and put in KVM's order.

Runs in: the process that created the vCPU's VM (the owner rule); any thread of it, one
caller per vCPU at a time (each :class:`KvmVcpu` reuses its own ctypes buffers, and KVM
serialises a vCPU's ioctls anyway). Different vCPUs may be driven from different threads:
:func:`devstate.devices.kvm.uapi.ioctl` releases the GIL for the call.

The record's layout and order are :mod:`.record`'s. Besides get and put:
:meth:`KvmVcpu.seed_state` gives a vCPU distinct contents KVM accepts (:mod:`.seed`), and
:meth:`KvmVcpu.compare` checks a readback against what was saved, field by field
(:mod:`.verify`).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Sequence

import xxhash

from devstate.devices.kvm import structs, uapi
from devstate.devices.kvm.record import (
    GET_IOCTL,
    HEADER,
    MAGIC,
    MSRS_HEADER,
    RESTORE_ORDER,
    SECTION,
    SET_IOCTL,
    STRUCTS,
    VERSION,
    Section,
    VcpuLayout,
    batched,
    bytes_of,
    msr_name,
    parse_record,
    write_section,
)
from devstate.devices.kvm.seed import seed_sections
from devstate.devices.kvm.uapi import Ioctl, IoctlFn
from devstate.devices.kvm.verify import TOLERANCES, Difference, diff_section, section_fields
from devstate.errors import DeviceError


class KvmVcpu:
    """One KVM vCPU, held by the process that created its VM."""

    def __init__(self, fd: int, vcpu_id: int, layout: VcpuLayout, *,
                 ioctl: IoctlFn = uapi.ioctl) -> None:
        self.fd = fd
        self.vcpu_id = vcpu_id
        self.layout = layout
        self.id = f"cpu/{vcpu_id}"
        self._ioctl = ioctl
        self._save = layout.sections
        self._record_bytes = layout.record_bytes  # layout properties compute; these are hot
        self._expected = [(s, layout.section_bytes(s)) for s in self._save]
        self._msr_indices = layout.msr_indices
        self._msrs_bytes = layout.section_bytes(Section.MSRS)
        self._restore = tuple(layout.resolve(s) for s in RESTORE_ORDER)
        self._get_ioctl = dict(GET_IOCTL)
        if layout.xsave2:
            self._get_ioctl[Section.XSAVE] = Ioctl.KVM_GET_XSAVE2
        # One reusable buffer per section: a get or put allocates nothing.
        self._buffers = {s: self._new_buffer(s) for s in self._save if s is not Section.MSRS}
        self._views = {s: bytes_of(b) for s, b in self._buffers.items()}
        # Reads have no order among MSRs, so a get reads them in as few batches as KVM
        # takes: each vCPU ioctl costs a vcpu_load/vcpu_put (~8 us on a nested host).
        self._msr_reads = _msr_batches(batched(layout.msr_indices))
        self._msr_writes = _msr_batches(layout.msr_chunks)
        self._msr_index_reader = struct.Struct("<" + "I12x" * len(self._msr_indices))
        self._closed = False

    def _new_buffer(self, section: Section) -> ctypes.Structure:
        if section is Section.XSAVE:
            return structs.xsave_type(self.layout.xsave_size)()
        return STRUCTS[section]()

    # -- get ------------------------------------------------------------------------

    def get(self, out: memoryview) -> int:
        """Read the vCPU's state from KVM into ``out``, in SAVE_ORDER; return its length.

        The VM must be stopped (no vCPU in KVM_RUN).
        """
        size = self._record_bytes
        if len(out) < size:
            raise DeviceError(self.id, f"get: buffer of {len(out)} B < record {size} B")
        HEADER.pack_into(out, 0, MAGIC, VERSION, len(self._save), self.vcpu_id, 0)
        pos = HEADER.size
        for section in self._save:
            if section is Section.MSRS:
                pos = self._get_msrs(out, pos)
            else:
                self._ioctl(self.fd, self._get_ioctl[section], self._buffers[section],
                            device=self.id)
                pos = write_section(out, pos, section, self._views[section])
        return pos

    def _get_msrs(self, out: memoryview, pos: int) -> int:
        SECTION.pack_into(out, pos, Section.MSRS, 0, self._msrs_bytes)
        pos += SECTION.size
        MSRS_HEADER.pack_into(out, pos, len(self._msr_indices), 0)
        pos += MSRS_HEADER.size
        for chunk, entries in self._msr_reads:
            done = self._ioctl(self.fd, Ioctl.KVM_GET_MSRS, chunk, device=self.id)
            self._check_msr_batch("KVM_GET_MSRS", chunk, done)
            out[pos:pos + len(entries)] = entries
            pos += len(entries)
        return pos

    # -- put ------------------------------------------------------------------------

    def put(self, data: memoryview) -> None:
        """Load a record made by :meth:`get` on a VM of the same layout, in RESTORE_ORDER."""
        sections = self.parse(data)
        self._check_msr_indices(sections[Section.MSRS])  # refuse before loading anything
        for section in self._restore:
            if section is Section.MSRS:
                self._put_msrs(sections[section])
            else:
                self._views[section][:] = sections[section]
                self._ioctl(self.fd, SET_IOCTL[section], self._buffers[section],
                            device=self.id)

    def _check_msr_indices(self, payload: memoryview) -> None:
        # Loading a subset would silently drop state; a superset cannot be loaded here.
        indices = self._msr_index_reader.unpack_from(payload, MSRS_HEADER.size)
        if indices != self._msr_indices:
            at = next(i for i, (a, b) in enumerate(zip(indices, self._msr_indices, strict=True))
                      if a != b)
            raise DeviceError(self.id, f"put: record's MSR #{at} is {msr_name(indices[at])}, "
                                       f"this VM migrates {msr_name(self._msr_indices[at])}")

    def _put_msrs(self, payload: memoryview) -> None:
        pos = MSRS_HEADER.size
        for chunk, entries in self._msr_writes:
            entries[:] = payload[pos:pos + len(entries)]
            done = self._ioctl(self.fd, Ioctl.KVM_SET_MSRS, chunk, device=self.id)
            self._check_msr_batch("KVM_SET_MSRS", chunk, done)
            pos += len(entries)

    def _check_msr_batch(self, op: str, chunk: ctypes.Structure, done: int) -> None:
        # KVM_GET/SET_MSRS return how many entries they processed, stopping at the first
        # MSR that failed: entries[done] is the culprit.
        if done != chunk.nmsrs:
            index = chunk.entries[done].index
            raise DeviceError(self.id, f"{op} stopped at {msr_name(index)} ({index:#x}) "
                                       f"after {done} of {chunk.nmsrs} MSRs")

    def parse(self, record: memoryview) -> dict[int, memoryview]:
        """A record's sections by tag, after checking its header and every section's length."""
        return parse_record(record, self.id, MAGIC, self.vcpu_id, self._expected)

    # -- seeding and verification -----------------------------------------------------

    def seed_state(self, seed: int) -> None:
        """Give this vCPU distinct, non-trivial state that KVM accepts, through :meth:`put`.

        Starts from the vCPU's current state, so every field not seeded keeps KVM's value.
        """
        record = bytearray(self.layout.record_bytes)
        self.get(memoryview(record))
        seed_sections(self.parse(memoryview(record)), self.vcpu_id, seed, self.layout)
        self.put(memoryview(record))

    def compare(self, saved: bytes | bytearray | memoryview,
                readback: bytes | bytearray | memoryview) -> list[Difference]:
        """Every field where ``readback`` differs from ``saved``, explained or not.

        A difference within a :data:`TOLERANCES` entry comes back with ``tolerance`` set;
        any other is unexplained. Every byte of every section is compared.
        """
        old, new = self.parse(memoryview(saved)), self.parse(memoryview(readback))
        return [diff for section in self._save
                for diff in diff_section(section, self.layout, old[section], new[section])]

    # -- lifecycle --------------------------------------------------------------------

    def stable_digest(self, record: bytearray) -> bytes:
        """xxh3_128 of a record of this vCPU with every :data:`TOLERANCES` field zeroed.

        Two vCPUs with equal stable digests agree on every field the kernel does not
        change by itself, so a source and a destination can be compared by digest.
        """
        sections = self.parse(memoryview(record))
        for tolerance in TOLERANCES:
            view = sections.get(self.layout.resolve(tolerance.section))
            if view is None:
                continue
            for field in section_fields(self.layout, self.layout.resolve(tolerance.section)):
                if field.name == tolerance.field:
                    view[field.offset:field.offset + field.size] = bytes(field.size)
        return xxhash.xxh3_128_digest(record)

    def close(self) -> None:
        """Close the vCPU fd. Idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __repr__(self) -> str:
        return f"KvmVcpu({self.id}, fd={self.fd})"


def _msr_batches(chunks: Sequence[Sequence[int]]) -> list[tuple[ctypes.Structure, memoryview]]:
    """For each chunk, a kvm_msrs with its indices filled in and a view of its entries."""
    batches = []
    for indices in chunks:
        batch = structs.msrs_type(len(indices))()
        batch.nmsrs = len(indices)
        for entry, index in zip(batch.entries, indices, strict=True):
            entry.index = index
        batches.append((batch, bytes_of(batch)[MSRS_HEADER.size:]))
    return batches
