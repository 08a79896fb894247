"""Checking a ``kvm`` vCPU's readback against what was put, field by field.

Every byte of every section is compared; the fields the kernel legitimately changes by
itself (the TSC moving on, the LAPIC timer counting down) are listed in
:data:`TOLERANCES` with why. The stable digest zeroes those fields, so a source and a
destination can be compared by digest.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from devstate.devices.kvm import structs
from devstate.devices.kvm.record import (
    MSRS_HEADER,
    STRUCTS,
    Section,
    VcpuLayout,
    msr_name,
)


@dataclass(frozen=True, slots=True)
class Field:
    """A named byte range of a section, compared as one little-endian integer."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Tolerance:
    """A field the kernel legitimately changes between a save and a readback."""

    section: Section
    field: str
    max_delta: int  # |readback - saved| allowed
    reason: str


TOLERANCES: tuple[Tolerance, ...] = (
    Tolerance(Section.MSRS, "IA32_TSC", 10**10,
              "the TSC keeps counting between the source's get and the readback; KVM moves "
              "a host write within 1 s of another vCPU's TSC onto that vCPU's "
              "(kvm_synchronize_tsc), and this host's KVM ignores host writes of it "
              "(measured), so the readback is the destination's own TSC, which on one host "
              "is the same clock; 10^10 ticks is 2 s at 5 GHz"),
    Tolerance(Section.LAPIC, "TMCCT", 2 * 10**9,
              "the APIC timer's current count is computed from the remaining time at each "
              "get and counts down; 2*10^9 is 2 s of KVM's 1 GHz APIC bus at divide-by-1"),
)
_TOLERANCE = {(t.section, t.field): t for t in TOLERANCES}


@dataclass(frozen=True, slots=True)
class Difference:
    """One field whose readback differs from what was saved."""

    section: Section
    field: str
    saved: int
    readback: int
    tolerance: Tolerance | None  # set when a listed tolerance covers the difference

    @property
    def explained(self) -> bool:
        """True if the kernel is known to change this field by this much."""
        return self.tolerance is not None

    def __str__(self) -> str:
        why = f" (tolerated: {self.tolerance.reason})" if self.tolerance else ""
        return (f"{self.section.name}.{self.field}: saved {self.saved:#x}, "
                f"read back {self.readback:#x}{why}")


def diff_section(section: Section, layout: VcpuLayout, old: memoryview,
                  new: memoryview) -> Iterator[Difference]:
    if old == new:
        return
    for field in section_fields(layout, section):
        end = field.offset + field.size
        if old[field.offset:end] != new[field.offset:end]:
            yield _difference(section, field, old[field.offset:end], new[field.offset:end])


def _difference(section: Section, field: Field, old: memoryview, new: memoryview) -> Difference:
    saved, readback = int.from_bytes(old, "little"), int.from_bytes(new, "little")
    tolerance = _TOLERANCE.get((section, field.name))
    if tolerance is not None and abs(readback - saved) > tolerance.max_delta:
        tolerance = None
    return Difference(section, field.name, saved, readback, tolerance)


@functools.cache
def section_fields(layout: VcpuLayout, section: Section) -> tuple[Field, ...]:
    """Every field of ``section``, covering each of its bytes exactly once."""
    if section is Section.XSAVE:
        fields = _xsave_fields(layout)
    elif section is Section.LAPIC:
        fields = _lapic_fields()
    elif section is Section.MSRS:
        fields = _msr_fields(layout.msr_indices)
    else:
        fields = list(_struct_fields(STRUCTS[section]))
    return _tile(fields, layout.section_bytes(section))


def _struct_fields(ctype: type[ctypes.Structure], prefix: str = "",
                   base: int = 0) -> Iterator[Field]:
    """The scalar leaves of a ctypes struct, named by their C path (``cs.base``)."""
    for name, member_type, *_ in ctype._fields_:
        offset = base + getattr(ctype, name).offset
        yield from _member_fields(member_type, prefix + name, offset)


def _member_fields(ctype: type[Any], name: str, offset: int) -> Iterator[Field]:
    # type[Any]: ctypes' stubs type a struct member as any C data type (pointers, unions,
    # functions); a kernel struct holds only structs, arrays and scalars.
    if issubclass(ctype, ctypes.Structure):
        yield from _struct_fields(ctype, name + ".", offset)
    elif issubclass(ctype, ctypes.Array):
        # An array type's element type and length: class attributes that ctypes sets and
        # its stubs do not declare.
        element: type[Any] = getattr(ctype, "_type_")  # noqa: B009
        length: int = getattr(ctype, "_length_")  # noqa: B009
        step = ctypes.sizeof(element)
        for i in range(length):
            yield from _member_fields(element, f"{name}[{i}]", offset + i * step)
    else:
        yield Field(name, offset, ctypes.sizeof(ctype))


_XSAVE_LEGACY = (Field("FCW", 0, 2), Field("FSW", 2, 2), Field("FTW", 4, 1),
                 Field("FOP", 6, 2), Field("FIP", 8, 8), Field("FDP", 16, 8),
                 Field("MXCSR", 24, 4), Field("MXCSR_MASK", 28, 4),
                 *(Field(f"ST{i}", 32 + 16 * i, 16) for i in range(8)),
                 *(Field(f"XMM{i}", 160 + 16 * i, 16) for i in range(16)),
                 Field("sw_reserved", 464, 48),  # the kernel writes its own bytes here
                 Field("XSTATE_BV", 512, 8), Field("XCOMP_BV", 520, 8))
# (name, bytes per register) of the components with architectural register names.
_XSAVE_REGISTERS = {2: ("YMM{}_H", 16), 5: ("K{}", 8), 6: ("ZMM{}_H", 32), 7: ("ZMM{}", 64)}


def _xsave_fields(layout: VcpuLayout) -> list[Field]:
    fields = list(_XSAVE_LEGACY)
    for c in layout.xsave_components:
        pattern, step = _XSAVE_REGISTERS.get(c.feature, (f"XFEATURE{c.feature}[{{}}]", 64))
        first = 16 if c.feature == 7 else 0  # Hi16_ZMM holds ZMM16-ZMM31
        fields += [Field(pattern.format(first + i), c.offset + at, min(step, c.size - at))
                   for i, at in enumerate(range(0, c.size, step))]
    return fields


_APIC_NAMES = {0x20: "ID", 0x30: "VERSION", 0x80: "TPR", 0x90: "APR", 0xA0: "PPR",
               0xB0: "EOI", 0xC0: "RRD", 0xD0: "LDR", 0xE0: "DFR", 0xF0: "SVR",
               **{0x100 + 0x10 * i: f"ISR{i}" for i in range(8)},
               **{0x180 + 0x10 * i: f"TMR{i}" for i in range(8)},
               **{0x200 + 0x10 * i: f"IRR{i}" for i in range(8)},
               0x280: "ESR", 0x2F0: "LVT_CMCI", 0x300: "ICR", 0x310: "ICR2",
               0x320: "LVT_TIMER", 0x330: "LVT_THERMAL", 0x340: "LVT_PMC",
               0x350: "LVT_LINT0", 0x360: "LVT_LINT1", 0x370: "LVT_ERROR",
               0x380: "TMICT", 0x390: "TMCCT", 0x3E0: "TDCR", 0x3F0: "SELF_IPI"}


def _lapic_fields() -> list[Field]:
    # 32-bit registers at a 16-byte stride; the other 12 bytes of each slot are compared too
    # (KVM keeps the x2APIC ICR's upper half in ICR's slot).
    fields = []
    for offset in range(0, structs.KVM_APIC_REG_SIZE, 16):
        name = _APIC_NAMES.get(offset, f"APIC_{offset:#05x}")
        fields += [Field(name, offset, 4), Field(f"{name}.upper", offset + 4, 12)]
    return fields


def _msr_fields(indices: Sequence[int]) -> list[Field]:
    fields = [Field("nmsrs", 0, 4), Field("pad", 4, 4)]
    for i, index in enumerate(indices):
        at = MSRS_HEADER.size + 16 * i
        name = msr_name(index)
        fields += [Field(f"{name}.index", at, 4), Field(f"{name}.reserved", at + 4, 4),
                   Field(name, at + 8, 8)]
    return fields


def _tile(fields: Sequence[Field], size: int) -> tuple[Field, ...]:
    """``fields`` in offset order, with every gap between them named, so no byte is skipped."""
    tiled: list[Field] = []
    pos = 0
    for field in sorted(fields, key=lambda f: f.offset):
        if field.offset < pos:
            raise ValueError(f"field {field.name} overlaps the one before it")
        if field.offset > pos:
            tiled.append(Field(f"bytes[{pos:#x}:{field.offset:#x}]", pos, field.offset - pos))
        tiled.append(field)
        pos = field.offset + field.size
    if pos > size:
        raise ValueError(f"fields end at {pos}, beyond the section's {size} B")
    if pos < size:
        tiled.append(Field(f"bytes[{pos:#x}:{size:#x}]", pos, size - pos))
    return tuple(tiled)
