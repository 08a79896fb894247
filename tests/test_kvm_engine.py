"""The vCPU engines (devstate.devices.kvm.engine): native steps and ctypes, checked against
each other on real vCPUs of one VM.

Each engine's put is judged by the *other* engine's get, and the source state is seeded
and saved by the ctypes path, so no test trusts the code it tests to see its own result.
The break tests take a step out of a program (or move one) and show that the same checks
notice: a put that skips DEBUGREGS, a get that writes XCRS at the wrong offset.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devstate.devices.kvm import engine as engine_mod
from devstate.devices.kvm.engine import (
    CtypesEngine,
    EngineName,
    Kind,
    NativeEngine,
    Program,
    Step,
    VcpuEngine,
    engine_name,
    make_engine,
    native_available,
)
from devstate.devices.kvm.record import RESTORE_ORDER, SAVE_ORDER, Section, VcpuLayout
from devstate.devices.kvm.uapi import Ioctl, KvmError
from devstate.devices.kvm.vcpu import KvmVcpu
from devstate.devices.kvm.vm import KvmVm
from devstate.errors import DeviceError, SpecError
from tests.test_kvm_vcpu import LAYOUTS, expected_ioctls, needs_kvm

SEED = 20261204
VCPUS = 12
needs_native = pytest.mark.skipif(not native_available(),
                                  reason="the C extension devstate.devices.kvm._steps is not "
                                         "built (no compiler at install time)")
ENGINES = [pytest.param(EngineName.NATIVE, marks=needs_native), EngineName.CTYPES]
OTHER = {EngineName.NATIVE: EngineName.CTYPES, EngineName.CTYPES: EngineName.NATIVE}


@dataclasses.dataclass
class Vms:
    """A seeded source VM and a blank destination VM of the same layout."""

    layout: VcpuLayout
    sources: list[KvmVcpu]
    targets: list[KvmVcpu]
    saved: list[bytes]  # the sources' records, got by the ctypes path

    def records(self) -> list[memoryview]:
        return [memoryview(bytearray(r)) for r in self.saved]


@pytest.fixture(scope="module")
def vms() -> Iterator[Vms]:
    with KvmVm(name="engine-src") as source, KvmVm(name="engine-dst") as dest:
        sources = [source.create_vcpu(i) for i in range(VCPUS)]
        targets = [dest.create_vcpu(i) for i in range(VCPUS)]
        for vcpu in sources:
            vcpu.seed_state(SEED)
        saved = []
        for vcpu in sources:
            out = bytearray(source.layout.record_bytes)
            vcpu.get(memoryview(out))
            saved.append(bytes(out))
        yield Vms(source.layout, sources, targets, saved)


def read(engine: VcpuEngine, vcpus: Sequence[KvmVcpu], size: int) -> list[bytearray]:
    outs = [bytearray(size) for _ in vcpus]
    engine.get(vcpus, [memoryview(o) for o in outs])
    return outs


def unexplained(vcpus: Sequence[KvmVcpu], saved: Sequence[bytes],
                readback: Sequence[bytearray]) -> dict[str, list[str]]:
    """Per vCPU, every field of ``readback`` that differs from ``saved`` beyond tolerance."""
    found = {}
    for vcpu, old, new in zip(vcpus, saved, readback, strict=True):
        diffs = [f"{d.section.name}.{d.field}" for d in vcpu.compare(old, new) if not d.explained]
        if diffs:
            found[vcpu.id] = diffs
    return found


# ------------------------------------------------------------------- programs (no KVM needed)

def _requests(program: Program) -> list[str]:
    return [Ioctl(s.request).name for s in program.steps
            if s.kind in (Kind.IOCTL, Kind.COUNTED) and s.target == engine_mod.Target.RECORD]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_programs_issue_the_ioctls_in_save_and_restore_order(layout: VcpuLayout) -> None:
    assert _requests(Program.of(engine_mod.get_steps(layout))) == \
        expected_ioctls(SAVE_ORDER, "GET", layout)
    put = Program.of(engine_mod.put_steps(layout, verify=True))
    assert _requests(put) == expected_ioctls(RESTORE_ORDER, "SET", layout)
    # The readback is a whole get, into the scratch record, after every set.
    readback = [Ioctl(s.request).name for s in put.steps
                if s.kind in (Kind.IOCTL, Kind.COUNTED) and s.target == engine_mod.Target.SCRATCH]
    assert readback == expected_ioctls(SAVE_ORDER, "GET", layout)


def test_the_engine_variable_picks_one_or_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVSTATE_KVM_ENGINE", "ctypes")
    assert engine_name() is EngineName.CTYPES
    monkeypatch.setenv("DEVSTATE_KVM_ENGINE", "fast")
    with pytest.raises(SpecError, match="DEVSTATE_KVM_ENGINE: 'fast': use native or ctypes"):
        engine_name()
    monkeypatch.setattr(engine_mod, "_native", lambda: None)  # as if the build had failed
    monkeypatch.setenv("DEVSTATE_KVM_ENGINE", "native")
    with pytest.raises(SpecError, match="not built"):
        engine_name()
    monkeypatch.delenv("DEVSTATE_KVM_ENGINE")
    assert engine_name() is EngineName.CTYPES  # the fallback, said by every report


# ---------------------------------------------------------------------------- real vCPUs

@needs_kvm
@needs_native
def test_native_get_reads_what_ctypes_reads(vms: Vms) -> None:
    native = read(NativeEngine(vms.layout), vms.sources, vms.layout.record_bytes)
    assert unexplained(vms.sources, vms.saved, native) == {}


@needs_kvm
@pytest.mark.parametrize("name", ENGINES)
@pytest.mark.parametrize("verify", [False, True], ids=["no-readback", "readback"])
def test_put_loads_every_section_as_the_other_engine_reads_it(vms: Vms, name: EngineName,
                                                              verify: bool) -> None:
    make_engine(vms.layout, name).put(vms.targets, vms.records(), verify=verify)
    back = read(make_engine(vms.layout, OTHER[name]), vms.targets, vms.layout.record_bytes)
    assert unexplained(vms.targets, vms.saved, back) == {}


@needs_kvm
@needs_native
def test_two_threads_on_halves_put_and_get_what_one_does(vms: Vms) -> None:
    native = NativeEngine(vms.layout)
    half = VCPUS // 2
    with ThreadPoolExecutor(2) as pool:
        records = vms.records()
        list(pool.map(lambda lo, hi: native.put(vms.targets[lo:hi], records[lo:hi], verify=True),
                      (0, half), (half, VCPUS)))
        outs = [bytearray(vms.layout.record_bytes) for _ in range(VCPUS)]
        views = [memoryview(o) for o in outs]
        list(pool.map(lambda lo, hi: native.get(vms.targets[lo:hi], views[lo:hi]),
                      (0, half), (half, VCPUS)))
    assert unexplained(vms.targets, vms.saved, outs) == {}


def _without(program: Program, what: str) -> Program:
    return Program.of([s for s in program.steps if s.what != what])


@needs_kvm
@needs_native
def test_a_put_that_skips_debugregs_is_caught(vms: Vms, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    # Start the targets from a state whose DEBUGREGS differ from the saved ones.
    with KvmVm(name="engine-blank") as blank:
        targets = [blank.create_vcpu(i) for i in range(2)]
        native = NativeEngine(vms.layout)
        broken = {v: _without(p, "KVM_SET_DEBUGREGS") for v, p in native._put.items()}
        monkeypatch.setattr(native, "_put", broken)
        native.put(targets, vms.records()[:2], verify=False)
        back = read(CtypesEngine(vms.layout), targets, vms.layout.record_bytes)
        caught = unexplained(targets, vms.saved[:2], back)
        assert caught and all(f.startswith("DEBUGREGS.") for fs in caught.values() for f in fs)
        # and the engine's own readback refuses it, naming the section
        with pytest.raises(DeviceError, match=r"cpu/0: put: the readback differs .*DEBUGREGS"):
            native.put(targets, vms.records()[:2], verify=True)


@needs_kvm
@needs_native
def test_a_get_that_writes_at_the_wrong_offset_is_caught(vms: Vms,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    native = NativeEngine(vms.layout)
    steps = [dataclasses.replace(s, offset=s.offset + 8) if s.what == "KVM_GET_XCRS" else s
             for s in native._get.steps]
    monkeypatch.setattr(native, "_get", Program.of(steps))
    got = read(native, vms.sources[:2], vms.layout.record_bytes)
    # XCRS lands 8 bytes late: its first bytes are stale, its last ones overwrite the next
    # section's header, which the comparison's framing check refuses.
    with pytest.raises(DeviceError, match="cpu/0: section 0 of 0 B where DEBUGREGS"):
        unexplained(vms.sources[:2], vms.saved[:2], got)
    front = vms.layout.payload_offsets()[Section.XCRS]
    assert got[0][front:front + 8] == bytes(8) != vms.saved[0][front:front + 8]


@needs_kvm
@needs_native
def test_a_failing_step_names_the_vcpu_the_step_and_errno(vms: Vms) -> None:
    native = NativeEngine(vms.layout)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)  # a closed fd: every ioctl on it is EBADF
    dead = KvmVcpu(fd, 1, vms.layout)
    with pytest.raises(KvmError, match=r"cpu/1: put step \d+: KVM_SET_MP_STATE failed: EBADF") \
            as caught:
        native.put([vms.targets[0], dead], vms.records()[:2], verify=False)
    assert caught.value.errno == errno.EBADF
    bad = Program.of([Step(Kind.IOCTL, "ioctl 0xdead", 0, 8, request=0xDEAD)])
    native._get = bad
    with pytest.raises(KvmError, match=r"cpu/0: get step 0: ioctl 0xdead failed: EINVAL"):
        read(native, vms.targets[:1], vms.layout.record_bytes)


@needs_kvm
@pytest.mark.parametrize("name", ENGINES)
def test_a_record_of_another_vcpu_or_layout_is_refused_before_any_set(
        vms: Vms, name: EngineName) -> None:
    engine = make_engine(vms.layout, name)
    with pytest.raises(DeviceError, match="cpu/1: .*(record is for vCPU 0|for id 0)"):
        engine.put([vms.targets[1]], vms.records()[:1], verify=True)
    record = vms.records()[0]
    offsets = vms.layout.payload_offsets()
    at = offsets[Section.MSRS] + 8  # the first MSR's index
    record[at] ^= 0xFF
    with pytest.raises(DeviceError, match="cpu/0: .*MSR"):
        engine.put([vms.targets[0]], [record], verify=True)


def test_without_a_compiler_the_package_still_builds_and_falls_back_to_ctypes(
        tmp_path: Path) -> None:
    # The extension is optional in setup.py: a failed compile is a warning, and the engine
    # then says ctypes. CC=/bin/false stands in for a machine without gcc.
    root = Path(__file__).resolve().parent.parent
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "devstate", tmp_path / "devstate",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    built = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "CC": "/bin/false"})
    assert built.returncode == 0, built.stderr
    assert 'building extension "devstate.devices.kvm._steps" failed' in built.stderr
    assert not list((tmp_path / "devstate").rglob("*.so"))
    said = subprocess.run([sys.executable, "-c", "from devstate.devices.kvm import engine; "
                           "print(engine.native_available(), engine.engine_name())"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert said.stdout.split() == ["False", "ctypes"], said.stderr
