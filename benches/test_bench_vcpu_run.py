"""Stop and resume of every vCPU of one KVM VM (devstate.devices.kvm.run), native engine
against the ctypes threads, 64 and 288 vCPUs, idle and busy guests.

Downtime runs from the source's last vCPU out of KVM_RUN to the destination's last vCPU back
in it, so what counts is what :meth:`VcpuRunner.stop` and :meth:`VcpuRunner.resume` return:
the monotonic time of the last vCPU thread's acknowledgement. A round settles (the vCPUs
back in the guest, or halted), then times a stop and a resume. The guests are the tiny
programs of ``tests/test_vcpu_run.py``: *idle* vCPUs halt (a real guest's common state;
KVM blocks them in the kernel), *busy* ones increment a counter in guest RAM without end
(every vCPU wants a host CPU: 32 or 144 per CPU on this 2-CPU host).

``extra_info``: the medians over the rounds of ``stop_ms`` and ``resume_ms`` (call to the
last acknowledgement) and ``resume_call_ms`` (until resume() returned to its caller), and
for the ctypes engine each over the native engine's in this run (``*_vs_native``; above 1:
slower). After the rounds every busy vCPU must have counted, and every idle one be at its
halt. Run: ``python -m pytest benches/test_bench_vcpu_run.py --benchmark-only``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

from devstate.devices.kvm.engine import EngineName
from devstate.devices.kvm.run import VcpuRunner

# The tests' guest: a VM, its RAM and each vCPU's registers set to run one tiny program.
from tests.kvm_access import KVM_UNAVAILABLE
from tests.test_vcpu_run import COUNT, HALT, NATIVE_BUILT, Guest

pytestmark = pytest.mark.skipif(KVM_UNAVAILABLE is not None, reason=str(KVM_UNAVAILABLE))
COUNTS = (64, 288)
GUESTS = {"idle": HALT, "busy": COUNT}
# Native first: the ctypes engine's ratios need its medians.
ENGINES = (EngineName.NATIVE, EngineName.CTYPES)
ROUNDS = 15
# Busy vCPUs share 2 cores with whatever else runs: each gets a turn within seconds.
ADVANCE_TIMEOUT_S = 10.0
SETTLE_S = 0.02  # before each stop: resumed vCPUs back in the guest, or halted again


def _ms(samples: list[int]) -> float:
    return round(statistics.median(samples) / 1e6, 3)


@pytest.mark.parametrize("engine", ENGINES, ids=str)
@pytest.mark.parametrize("kind", GUESTS)
@pytest.mark.parametrize("count", COUNTS)
def test_stop_and_resume(benchmark: Any, results: dict[str, dict[str, float]], count: int,
                         kind: str, engine: EngineName) -> None:
    if engine is EngineName.NATIVE and not NATIVE_BUILT:
        pytest.skip("devstate.devices.kvm._run is not built (pip install -e .)")
    group = f"{count}-vcpus-{kind}"
    benchmark.group = group
    stops: list[int] = []
    resumes: list[int] = []
    calls: list[int] = []
    guest = Guest(count, GUESTS[kind])
    try:
        with VcpuRunner(guest.vcpus, engine=engine) as runner:
            runner.start()

            def stop_and_resume() -> None:
                called = time.monotonic_ns()
                stops.append(runner.stop() - called)
                called = time.monotonic_ns()
                resumes.append(runner.resume() - called)
                calls.append(time.monotonic_ns() - called)

            before = guest.counters()
            benchmark.pedantic(stop_and_resume, setup=lambda: time.sleep(SETTLE_S),
                               rounds=ROUNDS, iterations=1)
            if kind == "busy":  # every vCPU ran again (quick mode times one round, no setup)
                deadline = time.monotonic() + ADVANCE_TIMEOUT_S
                while time.monotonic() < deadline and not all(
                        a != b for a, b in zip(guest.counters(), before, strict=True)):
                    time.sleep(SETTLE_S)
            runner.stop()
            if kind == "busy":
                assert all(a != b for a, b in zip(guest.counters(), before, strict=True))
            else:
                assert {guest.rip(i) for i in range(count)} <= {HALT[0], HALT[0] + 1}
    finally:
        guest.close()
    figures = {"stop_ms": _ms(stops), "resume_ms": _ms(resumes), "resume_call_ms": _ms(calls)}
    results.setdefault(group, {}).update({f"{engine}_{k}": v for k, v in figures.items()})
    benchmark.extra_info.update(figures)
    native = results[group]
    if engine is EngineName.CTYPES and "native_stop_ms" in native:
        for name in ("stop_ms", "resume_ms"):
            benchmark.extra_info[f"{name}_vs_native"] = round(
                figures[name] / native[f"native_{name}"], 2)
