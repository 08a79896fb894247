"""How a VM's owner gets and puts many vCPUs at once: the native step runner, or ctypes.

Runs in: the process that owns the VM, on any thread; one call per batch of vCPUs, and
several calls at once on other threads over disjoint vCPUs (the caller splits a batch).

The *native* engine (:mod:`._steps`, a C extension built by ``pip install``) runs a
*program* with the GIL released for the whole batch, writing and reading each record in
place (an arena slot). The program is this module's data, made from the record's layout
and :mod:`.record`'s SAVE_ORDER and RESTORE_ORDER, whose reasons live there: the extension
knows only how to issue a step and report the first one that fails. A get copies the
record's framing (and the MSR indices KVM_GET_MSRS needs) from a template, then issues the
gets; a put checks the framing, issues the sets, and, with ``verify``, gets the vCPU back
into a scratch record and compares every byte with what it loaded, bounding the fields of
:data:`~.verify.TOLERANCES` instead (a separate *stage*, timed apart).

The *ctypes* engine is the fallback: :class:`~.vcpu.KvmVcpu`'s get and put, one ioctl at a
time through ctypes (the GIL changes hands around each). It is what runs where the
extension could not be built, or where ``DEVSTATE_KVM_ENGINE=ctypes`` says so.
"""

from __future__ import annotations

import abc
import enum
import errno as errno_codes
import importlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from time import thread_time_ns
from types import ModuleType

from devstate.devices.kvm.record import (
    GET_IOCTL,
    HEADER,
    MAGIC,
    MSRS_HEADER,
    RESTORE_ORDER,
    SECTION,
    SET_IOCTL,
    VERSION,
    Section,
    VcpuLayout,
    batched,
    msr_name,
)
from devstate.devices.kvm.uapi import Ioctl, KvmError, ioctl_name
from devstate.devices.kvm.vcpu import KvmVcpu
from devstate.devices.kvm.verify import TOLERANCES, section_fields
from devstate.errors import DeviceError, SpecError

ENGINE_VARIABLE = "DEVSTATE_KVM_ENGINE"
MSR_ENTRY = 16  # struct kvm_msr_entry: index u32, reserved u32, data u64
_ID_OFFSET = 8  # of the vCPU id in the record header (HEADER: magic, version, count, id)


class EngineName(enum.StrEnum):
    """Which engine gets and puts a VM's vCPUs."""

    NATIVE = "native"
    CTYPES = "ctypes"


def native_module(name: str) -> ModuleType | None:
    """This package's C extension ``name`` (``_steps``, ``_run``), or None where it was not
    built (the install goes on without it: setup.py)."""
    try:
        return importlib.import_module(f"devstate.devices.kvm.{name}")
    except ImportError:
        return None


def _native() -> ModuleType | None:
    return native_module("_steps")


def native_available() -> bool:
    """True if the C extension was built and imports."""
    return _native() is not None


def engine_name() -> EngineName:
    """The engine this process uses: ``DEVSTATE_KVM_ENGINE`` if set, else native if built.

    Forcing ``native`` where the extension is missing is an error, never a silent fallback.
    """
    wanted = os.environ.get(ENGINE_VARIABLE, "").strip().lower()
    if not wanted:
        return EngineName.NATIVE if native_available() else EngineName.CTYPES
    try:
        name = EngineName(wanted)
    except ValueError:
        raise SpecError(ENGINE_VARIABLE, f"{wanted!r}: use native or ctypes") from None
    if name is EngineName.NATIVE and not native_available():
        raise SpecError(ENGINE_VARIABLE, "native, but the extension devstate.devices.kvm._steps "
                                         "was not built (reinstall with a C compiler: README)")
    return name


@dataclass(frozen=True, slots=True)
class BatchCost:
    """CPU time a batch's thread spent, in ns: in the state's ioctls, and in the readback
    check (both engines count the thread's CPU clock, so preemption is not a cost)."""

    state_ns: int = 0
    verify_ns: int = 0

    def __add__(self, other: BatchCost) -> BatchCost:
        return BatchCost(self.state_ns + other.state_ns, self.verify_ns + other.verify_ns)


class VcpuEngine(abc.ABC):
    """Gets and puts a batch of vCPUs of one VM (all of one :class:`VcpuLayout`)."""

    name: EngineName

    @abc.abstractmethod
    def get(self, vcpus: Sequence[KvmVcpu], outs: Sequence[memoryview]) -> BatchCost:
        """Read each vCPU into its ``outs`` entry (at least ``record_bytes`` long)."""

    @abc.abstractmethod
    def put(self, vcpus: Sequence[KvmVcpu], records: Sequence[memoryview], *,
            verify: bool) -> BatchCost:
        """Load each record into its vCPU; with ``verify``, read it back and fail on any
        difference no tolerance explains (:class:`DeviceError` naming the vCPU)."""


def make_engine(layout: VcpuLayout, name: EngineName | None = None) -> VcpuEngine:
    """The engine ``name`` (default: :func:`engine_name`) for vCPUs of ``layout``."""
    name = name or engine_name()
    return NativeEngine(layout) if name is EngineName.NATIVE else CtypesEngine(layout)


# ------------------------------------------------------------------------------- ctypes


class CtypesEngine(VcpuEngine):
    """One vCPU after another through :class:`KvmVcpu` (ctypes; the fallback)."""

    name = EngineName.CTYPES

    def __init__(self, layout: VcpuLayout) -> None:
        self._record_bytes = layout.record_bytes

    def get(self, vcpus: Sequence[KvmVcpu], outs: Sequence[memoryview]) -> BatchCost:
        """Read each vCPU into its ``outs`` entry."""
        start = thread_time_ns()
        for vcpu, out in zip(vcpus, outs, strict=True):
            vcpu.get(out)
        return BatchCost(thread_time_ns() - start)

    def put(self, vcpus: Sequence[KvmVcpu], records: Sequence[memoryview], *,
            verify: bool) -> BatchCost:
        """Load each record; with ``verify``, read back and compare field by field."""
        # One scratch per call: calls on other threads must not share it.
        scratch = bytearray(self._record_bytes)
        state = checking = 0
        for vcpu, record in zip(vcpus, records, strict=True):
            start = thread_time_ns()
            vcpu.put(record)
            state += thread_time_ns() - start
            if verify:
                start = thread_time_ns()
                vcpu.get(memoryview(scratch))
                check_readback(vcpu, record, scratch)
                checking += thread_time_ns() - start
        return BatchCost(state, checking)


def check_readback(vcpu: KvmVcpu, saved: memoryview, readback: bytes | bytearray) -> None:
    """Fail unless ``readback`` differs from ``saved`` only where a tolerance allows."""
    unexplained = [d for d in vcpu.compare(saved, readback) if not d.explained]
    if unexplained:
        shown = "; ".join(str(d) for d in unexplained[:3])
        raise DeviceError(vcpu.id, f"put: the readback differs in {len(unexplained)} "
                                   f"field(s): {shown}")


# ------------------------------------------------------------------------------- native


class Kind(enum.IntEnum):
    """What a step does (the extension's ``enum kind``)."""

    COPY = 1      # template bytes -> target
    CHECK = 2     # target bytes == template bytes
    ID = 3        # the vCPU id -> target u32
    CHECK_ID = 4  # target u32 == the vCPU id
    IOCTL = 5     # ioctl(fd, request, target + offset)
    COUNTED = 6   # ioctl on {u32 count, u32 0, entries}; must return count
    VERIFY = 7    # record == scratch where the mask says
    WITHIN = 8    # |scratch - record| <= arg


class Target(enum.IntEnum):
    """Which buffer a step works on."""

    RECORD = 0   # the vCPU's record, in its arena slot
    SCRATCH = 1  # the call's own scratch record (the readback)


class Stage(enum.IntEnum):
    """What a step's time counts as (:class:`BatchCost`)."""

    STATE = 0
    VERIFY = 1


STEP = struct.Struct("<8I2q")  # kind, target, stage, offset, length, count, stride, 0; request, arg


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a program; ``what`` names it in messages."""

    kind: Kind
    what: str
    offset: int = 0
    length: int = 0
    count: int = 1
    stride: int = 0
    request: int = 0
    arg: int = 0
    target: Target = Target.RECORD
    stage: Stage = Stage.STATE
    entries: tuple[str, ...] = ()  # COUNTED: each entry's name, for "stopped at"

    def pack(self) -> bytes:
        """The step as the extension reads it."""
        return STEP.pack(self.kind, self.target, self.stage, self.offset, self.length,
                         self.count, self.stride, 0, self.request, self.arg)

    def failure(self, err: int, result: int) -> str:
        """Why this step failed, from the extension's errno and result."""
        if err:
            name = errno_codes.errorcode.get(err, str(err))
            return f"{self.what} failed: {name} ({os.strerror(err)})"
        if self.kind is Kind.COUNTED:
            at = self.entries[result] if 0 <= result < len(self.entries) else "?"
            return f"{self.what} stopped at {at} after {result} of {self.count} entries"
        if self.kind is Kind.CHECK_ID:
            return f"{self.what}: the record is for vCPU {result}"
        if self.kind is Kind.WITHIN:
            return f"{self.what} moved by {result}, more than the {self.arg} tolerated"
        return f"{self.what}: differs at byte {result} of the record"


@dataclass(frozen=True, slots=True)
class Program:
    """Steps and their packed form."""

    steps: tuple[Step, ...]
    packed: bytes

    @classmethod
    def of(cls, steps: Sequence[Step]) -> Program:
        """A program of ``steps``, packed once."""
        return cls(tuple(steps), b"".join(s.pack() for s in steps))


def template_record(layout: VcpuLayout) -> bytearray:
    """A record of ``layout`` with its framing and MSR indices filled in, vCPU id 0, and
    every payload byte zero: what a get starts from and a put's framing is checked against."""
    record = bytearray(layout.record_bytes)
    HEADER.pack_into(record, 0, MAGIC, VERSION, len(layout.sections), 0, 0)
    offsets = layout.payload_offsets()
    for section in layout.sections:
        SECTION.pack_into(record, offsets[section] - SECTION.size, section, 0,
                          layout.section_bytes(section))
    entries = offsets[Section.MSRS] + MSRS_HEADER.size
    MSRS_HEADER.pack_into(record, entries - MSRS_HEADER.size, len(layout.msr_indices), 0)
    for i, index in enumerate(layout.msr_indices):
        struct.pack_into("<I", record, entries + MSR_ENTRY * i, index)
    return record


def tolerance_fields(layout: VcpuLayout) -> list[tuple[str, int, int, int]]:
    """(name, record offset, size, max delta) of each field a tolerance covers."""
    offsets = layout.payload_offsets()
    found = []
    for tolerance in TOLERANCES:
        section = layout.resolve(tolerance.section)
        for field in section_fields(layout, section):
            if field.name == tolerance.field:
                found.append((f"{section.name}.{field.name}", offsets[section] + field.offset,
                              field.size, tolerance.max_delta))
    return found


def get_steps(layout: VcpuLayout, target: Target = Target.RECORD,
              stage: Stage = Stage.STATE) -> list[Step]:
    """A get in SAVE_ORDER into ``target``: framing from the template, then each section."""
    offsets = layout.payload_offsets()
    steps = [Step(Kind.COPY, "framing", 0, layout.record_bytes, target=target, stage=stage),
             Step(Kind.ID, "vCPU id", _ID_OFFSET, target=target, stage=stage)]
    for section in layout.sections:
        if section is Section.MSRS:
            steps += _msr_steps(layout, batched(layout.msr_indices), offsets[section],
                                Ioctl.KVM_GET_MSRS, target, stage)
            continue
        request = _get_request(layout, section)
        steps.append(Step(Kind.IOCTL, ioctl_name(request), offsets[section],
                          layout.section_bytes(section), request=request, target=target,
                          stage=stage))
    return steps


def put_steps(layout: VcpuLayout, *, verify: bool) -> list[Step]:
    """A put: the framing checked, each section set in RESTORE_ORDER, and with ``verify``
    the readback into scratch compared with the record."""
    offsets = layout.payload_offsets()
    msrs = offsets[Section.MSRS] - SECTION.size  # the MSRS section's header
    steps = [Step(Kind.CHECK, "record header", 0, _ID_OFFSET),
             Step(Kind.CHECK_ID, "record header", _ID_OFFSET),
             Step(Kind.CHECK, "record header", _ID_OFFSET + 4, 4)]
    steps += [Step(Kind.CHECK, f"{s.name} section header", offsets[s] - SECTION.size,
                   SECTION.size) for s in layout.sections]
    steps += [Step(Kind.CHECK, "MSRS count", msrs + SECTION.size, MSRS_HEADER.size),
              Step(Kind.CHECK, "MSR indices", msrs + SECTION.size + MSRS_HEADER.size, 4,
                   count=len(layout.msr_indices), stride=MSR_ENTRY)]
    for section in (layout.resolve(s) for s in RESTORE_ORDER):
        if section is Section.MSRS:
            steps += _msr_steps(layout, layout.msr_chunks, offsets[section],
                                Ioctl.KVM_SET_MSRS, Target.RECORD, Stage.STATE)
            continue
        request = SET_IOCTL[section]
        steps.append(Step(Kind.IOCTL, request.name, offsets[section],
                          layout.section_bytes(section), request=request))
    if verify:
        steps += get_steps(layout, Target.SCRATCH, Stage.VERIFY)
        steps.append(Step(Kind.VERIFY, "readback", 0, layout.record_bytes,
                          stage=Stage.VERIFY))
        steps += [Step(Kind.WITHIN, f"readback {name}", offset, size, arg=delta,
                       stage=Stage.VERIFY)
                  for name, offset, size, delta in tolerance_fields(layout)]
    return steps


def _get_request(layout: VcpuLayout, section: Section) -> Ioctl:
    if section is Section.XSAVE and layout.xsave2:
        return Ioctl.KVM_GET_XSAVE2
    return GET_IOCTL[section]


def _msr_steps(layout: VcpuLayout, chunks: Sequence[Sequence[int]], payload: int,
               request: Ioctl, target: Target, stage: Stage) -> list[Step]:
    """One COUNTED step per chunk of MSRs, at its entries' place in the record."""
    steps = []
    position = {index: i for i, index in enumerate(layout.msr_indices)}
    for chunk in chunks:
        first = position[chunk[0]]
        steps.append(Step(Kind.COUNTED, request.name,
                          payload + MSRS_HEADER.size + MSR_ENTRY * first,
                          MSR_ENTRY * len(chunk), count=len(chunk), request=request,
                          arg=1 if request is Ioctl.KVM_GET_MSRS else 0, target=target,
                          stage=stage, entries=tuple(msr_name(i) for i in chunk)))
    return steps


class NativeEngine(VcpuEngine):
    """A batch in one call of the C extension, the GIL released throughout."""

    name = EngineName.NATIVE

    def __init__(self, layout: VcpuLayout) -> None:
        module = _native()
        if module is None:
            raise DeviceError("kvm", "the native vCPU engine (devstate.devices.kvm._steps) "
                                     "is not built")
        self._run = module.run
        self._template = bytes(template_record(layout))
        mask = bytearray(b"\xff" * layout.record_bytes)
        for _, offset, size, _ in tolerance_fields(layout):
            mask[offset:offset + size] = bytes(size)
        self._mask = bytes(mask)
        self._get = Program.of(get_steps(layout))
        self._put = {verify: Program.of(put_steps(layout, verify=verify))
                     for verify in (False, True)}

    def get(self, vcpus: Sequence[KvmVcpu], outs: Sequence[memoryview]) -> BatchCost:
        """Read each vCPU into its ``outs`` entry, the GIL released."""
        return self._call("get", self._get, vcpus, outs, writable=True)

    def put(self, vcpus: Sequence[KvmVcpu], records: Sequence[memoryview], *,
            verify: bool) -> BatchCost:
        """Load each record (and, with ``verify``, check its readback), the GIL released."""
        return self._call("put", self._put[verify], vcpus, records, writable=False)

    def _call(self, op: str, program: Program, vcpus: Sequence[KvmVcpu],
              records: Sequence[memoryview], *, writable: bool) -> BatchCost:
        size = len(self._template)
        for vcpu, record in zip(vcpus, records, strict=True):
            if len(record) != size and not (writable and len(record) > size):
                raise DeviceError(vcpu.id, f"{op}: a record of {len(record)} B where this "
                                           f"VM's are {size} B")
        at, step, err, result, state_ns, verify_ns = self._run(
            program.packed, self._template, self._mask, [v.fd for v in vcpus],
            [v.vcpu_id for v in vcpus], records, writable)
        if at >= 0:
            raise self._failure(op, program, vcpus[at], records[at], step, err, result)
        return BatchCost(state_ns, verify_ns)

    def _failure(self, op: str, program: Program, vcpu: KvmVcpu, record: memoryview,
                 index: int, err: int, result: int) -> DeviceError:
        step = program.steps[index]
        if err:
            return KvmError(vcpu.id, f"{op} step {index}: {step.what}", err)
        if step.kind is Kind.VERIFY:
            # Explain it field by field: read the vCPU back (ctypes) and compare.
            readback = bytearray(len(self._template))
            try:
                vcpu.get(memoryview(readback))
                check_readback(vcpu, record, readback)
            except DeviceError as exc:
                return exc
        return DeviceError(vcpu.id, f"{op} step {index}: {step.failure(err, result)}")
