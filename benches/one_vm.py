"""One KVM VM per side, measured per side: devstate's vCPU engines beside the physical limit.

A real guest is ONE KVM VM owned by one process (ARCHITECTURE.md section 3), so this is
the only shape measured here. :class:`OneVmSides` holds a seeded source VM and a blank
destination VM of ``count`` vCPUs in this process and gets (source) and puts
(destination) all of them with one variant:

* ``native-1``: the native engine (C steps, GIL released) on one thread;
* ``native-T``: the native engine on T threads, each pinned to a CPU, a batch each;
* ``ctypes-1``: the ctypes fallback on one thread (more threads only fight over the GIL).

Each get is checked against a reference got by the ctypes path at set-up, each put by
reading the destination back with the *other* engine and comparing stable digests: every
variant verifies what it moves. The reference is ``benches/kvm_limit/vcpu_threads.c``
(the project's physical-limit probe: the same ioctls from C threads of one process, one
VM), built with gcc and run in the same session: :func:`probe`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devstate.devices.kvm.engine import (
    CtypesEngine,
    EngineName,
    NativeEngine,
    VcpuEngine,
    native_available,
)
from devstate.devices.kvm.vm import KvmVm
from devstate.lifecycle import no_gc_pauses

PROBE_SOURCE = Path(__file__).resolve().parent / "kvm_limit" / "vcpu_threads.c"
SEED = 7
CPUS = tuple(sorted(os.sched_getaffinity(0)))


def variants() -> list[str]:
    """The variants this host can run (native ones need the built extension)."""
    native = ["native-1", f"native-{len(CPUS)}"] if native_available() else []
    return [*native, "ctypes-1"]


class OneVmSides:
    """A seeded source VM and a blank destination VM of ``count`` vCPUs, and the buffers a
    get fills and a put reads (one record per vCPU, as arena slots would hold them)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.source = KvmVm(name="bench-source")
        self.dest = KvmVm(name="bench-dest")
        self.sources = [self.source.create_vcpu(i) for i in range(count)]
        self.targets = [self.dest.create_vcpu(i) for i in range(count)]
        for vcpu in self.sources:
            vcpu.seed_state(SEED)
        size = self.source.layout.record_bytes
        self._buffer = bytearray(size * count)
        self.records = [memoryview(self._buffer)[i * size:(i + 1) * size] for i in range(count)]
        self.engines: dict[EngineName, VcpuEngine] = {EngineName.CTYPES: CtypesEngine(
            self.source.layout)}
        if native_available():
            self.engines[EngineName.NATIVE] = NativeEngine(self.source.layout)
        self.engines[EngineName.CTYPES].get(self.sources, self.records)
        self.reference = self._digests(self.sources, self.records)
        self._threads = ThreadPoolExecutor(len(CPUS), thread_name_prefix="bench-vcpu",
                                           initializer=_pin_next, initargs=(iter(CPUS),))
        for variant in variants():  # untimed: threads started, both VMs' vCPUs touched
            self.run(variant, "get")
            self.run(variant, "put")

    def run(self, variant: str, op: str) -> None:
        """Get every source vCPU (``op`` "get") or put every record into the destination
        ("put"), the ``variant`` way; no readback inside the put (measured as the limit is)."""
        name, threads = variant.rsplit("-", 1)
        engine = self.engines[EngineName(name)]
        vcpus = self.sources if op == "get" else self.targets
        if op == "get":
            def call(lo: int, hi: int) -> object:
                return engine.get(vcpus[lo:hi], self.records[lo:hi])
        else:
            def call(lo: int, hi: int) -> object:
                return engine.put(vcpus[lo:hi], self.records[lo:hi], verify=False)
        parts = int(threads)
        if parts == 1:
            call(0, self.count)
            return
        cuts = [self.count * k // parts for k in range(parts + 1)]
        running = [self._threads.submit(call, cuts[k], cuts[k + 1]) for k in range(parts)]
        for done in running:
            done.result()

    def check(self, variant: str, op: str) -> None:
        """Fail unless the last ``op`` moved every vCPU's state (stable digests, read back
        by the other engine after a put)."""
        if op == "get":
            got = self._digests(self.sources, self.records)
        else:
            other = EngineName.NATIVE if variant.startswith("ctypes") else EngineName.CTYPES
            readback = bytearray(len(self._buffer))
            size = len(self.records[0])
            views = [memoryview(readback)[i * size:(i + 1) * size] for i in range(self.count)]
            self.engines.get(other, self.engines[EngineName.CTYPES]).get(self.targets, views)
            got = self._digests(self.targets, views)
        wrong = [i for i, (a, b) in enumerate(zip(got, self.reference, strict=True)) if a != b]
        assert not wrong, (f"{variant} {op}: {len(wrong)} of {self.count} vCPUs differ, "
                           f"e.g. {wrong[:3]}")

    @staticmethod
    def _digests(vcpus: list, records: list[memoryview]) -> list[bytes]:
        return [v.stable_digest(bytearray(r)) for v, r in zip(vcpus, records, strict=True)]

    def close(self) -> None:
        """Close both VMs and the threads."""
        self._threads.shutdown()
        self.source.close()
        self.dest.close()


def interleaved_round(sides: OneVmSides, binary: Path | None,
                      samples: dict[str, list[float]]) -> None:
    """One round: every variant's get and put (each checked after it is timed), then the
    probe; adds each one's ms to ``samples["op variant"]`` (the probe as ``probe-T``)."""
    for variant in variants():
        for op in ("get", "put"):
            with no_gc_pauses():
                start = time.perf_counter()
                sides.run(variant, op)
                took = (time.perf_counter() - start) * 1e3
            samples.setdefault(f"{op} {variant}", []).append(took)
            sides.check(variant, op)
    if binary is not None:
        for key, ms in probe(binary, sides.count, rounds=1).items():
            op, threads = key.split("-")
            samples.setdefault(f"{op} probe-{threads}", []).append(ms)


def _pin_next(cpus: object) -> None:
    os.sched_setaffinity(0, {next(cpus)})  # type: ignore[call-overload]


def build_probe(out_dir: str) -> Path | None:
    """Compile the physical-limit probe; None (and why on stderr) if gcc is missing."""
    if shutil.which("gcc") is None:
        return None
    binary = Path(out_dir) / "vcpu_threads"
    subprocess.run(["gcc", "-O2", "-pthread", str(PROBE_SOURCE), "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    return binary


_LINE = re.compile(r"^(get|put) (\d) threads? +\d+ vCPUs: median ([\d.]+) ms", re.M)


def probe(binary: Path, count: int, rounds: int = 3, *,
          tick_ms: float | None = None) -> dict[str, float]:
    """The probe's medians in ms: ``get-1``, ``get-2``, ``put-1``, ``put-2``; with
    ``tick_ms``, with the LAPIC timers of its VM and of a second one ticking that often,
    as a live guest's do during its migration (the probe's source says how)."""
    tick = [str(round(tick_ms * 1e6))] if tick_ms else []
    done = subprocess.run([str(binary), str(count), str(rounds), *tick], capture_output=True,
                          text=True, check=True, timeout=300)
    return {f"{op}-{threads}": float(ms) for op, threads, ms in _LINE.findall(done.stdout)}


def limit_ms(measured: dict[str, float]) -> float:
    """A stop-and-copy's floor with both sides on this host: (C get, 1 thread + C put,
    1 thread) / cores, as the probe's README defines it."""
    return (measured["get-1"] + measured["put-1"]) / len(CPUS)


def with_probe(fn: Callable[[Path | None], object]) -> object:
    """Run ``fn`` with the built probe (None without gcc), in a directory removed after."""
    with tempfile.TemporaryDirectory(prefix="devstate-probe-") as tmp:
        return fn(build_probe(tmp))
