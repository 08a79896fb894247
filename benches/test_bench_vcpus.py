"""Record devices through the pool: get and put every vCPU of a 128-, 512- and 1024-vCPU
machine of ``sim-vcpu`` records, four ways.

``sim-vcpu`` (:mod:`devstate.devices.vcpu_sim`): a get or a put copies the record and burns
45 us of CPU holding the GIL, what a KVM get cost on this machine kind. This measures the
process pool's architecture (shared-memory slots vs pickling executors vs threads) on
Python-bound record devices. Real KVM vCPUs are not measured here: a guest is ONE KVM VM
owned by one process, so they are ``benches/test_bench_kvm.py``'s (one VM per side, the
native engine beside the physical limit); spreading them over a VM per worker, as this
pool variant would, is not a shape any guest has.

Both sides of a migration on one 2-core host would share its cores, so one side is
measured alone. A round *gets* every vCPU into memory, then *puts* every vCPU back from
it, with

* ``devstate-pool``: devstate's pool (:class:`devstate.migration.source.SourceVM`, 2
  workers); each worker owns its share of the vCPUs and gets into, and puts from, its
  arena slots (``SnapshotRecords`` / ``RestoreRecords``): no byte crosses a pipe;
* ``sequential``: one process, one thread (what a one-thread VMM does);
* ``threads``: the same process, a thread per core; sim-vcpu's get is Python holding the
  GIL, so its threads cannot overlap;
* ``executor``: plain ``concurrent.futures.ProcessPoolExecutor`` workers (forkserver, not
  pinned to CPUs), the pool without shared memory, drawn below.

Every variant calls devstate's own device objects (``RecordDevice.get``/``put``, what a
pool worker calls), so each does the same per-vCPU work and the variants differ only in
where it runs and how the state moves. A sim-vcpu put loads and checks the record's
layout, but does not read back: the pool runs exactly that, and a readback in the other
variants alone would cost them a second 45 us per vCPU. Instead, after the timed rounds,
each variant's vCPUs are read back and their digests compared with the ones that machine
had when freshly seeded (untimed, and in quick mode, ``--benchmark-disable``, too): the
check that every put loaded what the get took.

The executor variant, one round::

    coordinator (this process)                 executor k (k = 0, 1: one worker process,
                                               its own share of the vCPUs since start-up)
    submit(_get_share)        ---call queue--> get each vCPU of the share into a buffer
    states[k] = result()      <---pickled----- the share's records, one bytearray
      ... the coordinator holds every share's bytes, as a migration's would ...
    submit(_put_share, states[k]) --pickled--> put each record from the received bytes
    result()                  <----None------- (the share loaded)

It is two one-worker executors, not one with two workers: the owner rule fixes which
process may get or put a device, and a ProcessPoolExecutor gives a task to whichever
worker is idle, with no way to choose one.

``extra_info``: ``per_vcpu_us`` (a round's median over the vCPUs), ``get_us_per_vcpu`` and
``put_us_per_vcpu`` (the medians of the round's two halves, per vCPU), and
``vs_devstate_pool``: this variant's median over devstate's pool's, both measured in this
run (above 1: slower than the pool). Run:
``python -m pytest benches/test_bench_vcpus.py --benchmark-only``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
import uvloop

from benches.conftest import median_s
from devstate.config.params import MigrationParams
from devstate.config.spec import Backend, DeviceSpec, MachineConfig, parse_spec
from devstate.devices import (
    Device,
    DeviceHost,
    RecordDevice,
    device_table,
    make_device,
    record_size,
)
from devstate.lifecycle import no_gc_pauses
from devstate.migration.source import SourceVM
from devstate.worker import jobs as m

COUNTS = (128, 512, 1024)
# Threads, executor workers and pool workers alike: one per core of the 2-core host.
WORKERS = 2
# Rounds per benchmark: few, so that the whole file stays within ~90 s on 2 cores.
ROUNDS = 5
SEED = 7
POOL = "devstate-pool"
# devstate's pool first: every other variant's ratio needs its median.
VARIANTS = (POOL, "sequential", "threads", "executor")


@functools.cache
def vcpu_backend() -> tuple[Backend, str]:
    """The backend this file measures, and why."""
    return Backend.SIM_VCPU, ("record devices through the pool; kvm vCPUs are one VM per "
                              "side: benches/test_bench_kvm.py")


def machine(count: int, backend: Backend) -> MachineConfig:
    """The benchmarked machine: ``count`` seeded vCPUs and nothing else."""
    return parse_spec({"seed": SEED, "vcpus": {"count": count, "backend": str(backend)}})


def shares(count: int) -> list[range]:
    """The vCPUs of each worker, dealt as devstate's plan deals records (n to n % WORKERS)."""
    return [range(k, count, WORKERS) for k in range(WORKERS)]


def _without_gc(fn: Callable[[], None]) -> Callable[[], None]:
    """Every variant runs without cyclic-GC pauses, as devstate's stop-and-copy does."""
    def run() -> None:
        with no_gc_pauses():
            fn()
    return run


def _vcpu(spec: DeviceSpec, seed: int, host: DeviceHost) -> RecordDevice:
    device = make_device(spec, seed, incoming=False, host=host)
    assert isinstance(device, RecordDevice), spec.id
    return device


async def _digests(devices: Sequence[Device]) -> dict[str, str]:
    return {d.id: (await d.digest()).hex() for d in devices}


async def _each(devices: Sequence[Device], step: str) -> None:
    for device in devices:
        await getattr(device, step)()


class VcpuShare:
    """Some vCPUs of a machine, as devstate's device objects, and one buffer for all of
    their records, back to back.

    Runs in: the process that built it, the only one that may touch its vCPUs. A kvm vCPU
    lives in the KVM VM of the share's :class:`~devstate.devices.host.DeviceHost`, which
    only this process may drive.
    """

    def __init__(self, spec: MachineConfig, ids: Iterable[int]) -> None:
        table = {d.id: d for d in device_table(spec)}
        self.host = DeviceHost()
        self.devices = [_vcpu(table[f"cpu/{i}"], spec.seed, self.host) for i in ids]
        self.size = record_size(spec.vcpus.backend, "cpu/0")
        self.state = bytearray(self.size * len(self.devices))
        self.records = self.views(self.state)
        asyncio.run(_each(self.devices, "open"))  # kvm: create and seed the vCPUs

    def views(self, state: bytes | bytearray) -> list[memoryview]:
        """One view per vCPU of a buffer of this share's records."""
        whole = memoryview(state)
        return [whole[k * self.size:(k + 1) * self.size] for k in range(len(self.devices))]

    def get(self, indices: Iterable[int]) -> None:
        """Get the vCPUs at ``indices`` (positions in this share) into :attr:`state`."""
        for i in indices:
            self.devices[i].get(self.records[i])

    def put(self, indices: Iterable[int], records: Sequence[memoryview] | None = None) -> None:
        """Put the vCPUs at ``indices`` from ``records`` (default: :attr:`state`)."""
        records = self.records if records is None else records
        for i in indices:
            self.devices[i].put(records[i])

    def digests(self) -> dict[str, str]:
        """Each vCPU's state digest, read back from the vCPU (kvm: tolerated fields zeroed)."""
        return asyncio.run(_digests(self.devices))

    def close(self) -> None:
        """Close every vCPU (kvm: and the VM with the last)."""
        asyncio.run(_each(self.devices, "close"))


class OneProcess:
    """Every vCPU in this process (kvm: in one VM), and a thread per core for them."""

    def __init__(self, count: int, backend: Backend = Backend.KVM) -> None:
        self.vcpus = VcpuShare(machine(count, backend), range(count))
        self.pool = ThreadPoolExecutor(WORKERS)
        try:
            self.seeded = self.digests()
        except BaseException:  # a half-built variant must not outlive the failure
            self.close()
            raise

    def get(self, indices: Iterable[int]) -> None:
        self.vcpus.get(indices)

    def put(self, indices: Iterable[int]) -> None:
        self.vcpus.put(indices)

    def threaded(self, fn: Callable[[range], None]) -> None:
        """Run ``fn`` (``get`` or ``put``) on every vCPU, each thread taking a share."""
        for future in [self.pool.submit(fn, share) for share in shares(len(self.vcpus.devices))]:
            future.result()

    def digests(self) -> dict[str, str]:
        return self.vcpus.digests()

    def close(self) -> None:
        self.pool.shutdown()
        self.vcpus.close()


# An executor worker's vCPUs, made by its initializer; None in any other process.
_OWNED: VcpuShare | None = None


def _open_share(spec_data: dict[str, Any], ids: list[int]) -> None:
    """Runs in: an executor worker, as its initializer: create (kvm: in a VM of this
    process's own, the owner rule) and seed the worker's share of the vCPUs."""
    global _OWNED
    _OWNED = VcpuShare(parse_spec(spec_data), ids)


def _owned() -> VcpuShare:
    if _OWNED is None:
        raise RuntimeError("this process owns no vCPUs: it is not an executor worker")
    return _OWNED


def _get_share() -> bytearray:
    """Runs in: an executor worker. Get its vCPUs; the executor pickles the bytes back."""
    share = _owned()
    with no_gc_pauses():
        share.get(range(len(share.devices)))
    return share.state


def _put_share(state: bytes | bytearray) -> None:
    """Runs in: an executor worker. Put its vCPUs from the bytes the executor unpickled."""
    share = _owned()
    with no_gc_pauses():
        share.put(range(len(share.devices)), share.views(state))


def _share_digests() -> dict[str, str]:
    """Runs in: an executor worker. Its vCPUs' digests."""
    return _owned().digests()


class PicklingPool:
    """A plain one-worker ProcessPoolExecutor per share; state crosses the pipes pickled.

    Runs in: the coordinator. Between a get and a put the coordinator holds every share's
    bytes (:attr:`states`), as a migration coordinator without shared memory must.
    """

    def __init__(self, count: int, backend: Backend = Backend.KVM) -> None:
        spec_data = machine(count, backend).to_dict()
        ctx = multiprocessing.get_context("forkserver")  # never fork: this process has threads
        self.executors: list[ProcessPoolExecutor] = []
        self.states: list[bytes | bytearray] = []
        try:
            for ids in shares(count):
                self.executors.append(ProcessPoolExecutor(
                    1, mp_context=ctx, initializer=_open_share, initargs=(spec_data, list(ids))))
            self.seeded = self.digests()  # starts the workers now, not in round 1
        except BaseException:
            self.close()
            raise

    def get(self) -> None:
        futures = [executor.submit(_get_share) for executor in self.executors]
        self.states = [future.result() for future in futures]

    def put(self) -> None:
        futures = [executor.submit(_put_share, state)
                   for executor, state in zip(self.executors, self.states, strict=True)]
        for future in futures:
            future.result()

    def digests(self) -> dict[str, str]:
        futures = [executor.submit(_share_digests) for executor in self.executors]
        return {i: h for future in futures for i, h in future.result().items()}

    def close(self) -> None:
        """Stop the workers (a worker's exit closes its VM). Idempotent."""
        for executor in self.executors:
            executor.shutdown()


class Pool:
    """devstate's source side: a pool whose workers each own their share of the vCPUs."""

    def __init__(self, count: int, backend: Backend = Backend.KVM) -> None:
        self.loop = uvloop.new_event_loop()
        self.machine = SourceVM(machine(count, backend),
                                MigrationParams(workers=WORKERS, record_slots=count))
        try:
            self.loop.run_until_complete(self.machine.start())
            self.seeded = self.digests()
        except BaseException:  # a half-built variant must not outlive the failure
            self.close()
            raise

    def call(self, command: object) -> None:
        pool = self.machine.pool  # timed_rounds runs every round without GC pauses
        self.loop.run_until_complete(pool.call_all({w: command for w in range(pool.size)}))

    def get(self) -> None:
        self.call(m.SnapshotRecords())

    def put(self) -> None:
        self.call(m.RestoreRecords())

    def digests(self) -> dict[str, str]:
        every = self.loop.run_until_complete(self.machine.digests())
        return {i: h for i, h in every.items() if i.startswith("cpu/")}  # no kvm vm/* parts

    def close(self) -> None:
        self.loop.run_until_complete(self.machine.close())
        self.loop.close()


class SeededMachine(Protocol):
    """What every variant's machine has: its vCPUs' digests now, and once seeded.

    A kvm vCPU's seeded state depends on when its VM was made (its TSC deadline is set
    ahead of the TSC), so each machine is checked against its own seeded digests.
    """

    seeded: dict[str, str]

    def digests(self) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True)
class Variant:
    """One way to get and put every vCPU of a machine."""

    get: Callable[[], None]
    put: Callable[[], None]
    machine: SeededMachine


def build_variants(count: int, backend: Backend,
                   stack: contextlib.ExitStack) -> dict[str, Variant]:
    """Every variant's machine, closed by ``stack``. Idle ones use no CPU."""
    # devstate's pool first: it sets the forkserver's preload, which only its first start uses.
    pool = stack.enter_context(contextlib.closing(Pool(count, backend)))
    executor = stack.enter_context(contextlib.closing(PicklingPool(count, backend)))
    one = stack.enter_context(contextlib.closing(OneProcess(count, backend)))
    everyone = range(count)
    return {
        POOL: Variant(pool.get, pool.put, pool),
        "sequential": Variant(lambda: one.get(everyone), lambda: one.put(everyone), one),
        "threads": Variant(lambda: one.threaded(one.get), lambda: one.threaded(one.put), one),
        "executor": Variant(executor.get, executor.put, executor),
    }


@pytest.fixture(scope="module")
def machines(request) -> Iterator[tuple[int, dict[str, Variant]]]:
    """The variants for one vCPU count."""
    count = request.param
    with contextlib.ExitStack() as stack:
        yield count, build_variants(count, vcpu_backend()[0], stack)


def timed_rounds(benchmark, variant: Variant) -> dict[str, list[float]]:
    """Benchmark rounds of ``variant``'s get then put; return each half's seconds by round."""
    halves: dict[str, list[float]] = {"get": [], "put": []}

    def one_round() -> None:
        start = time.perf_counter()
        variant.get()
        middle = time.perf_counter()
        variant.put()
        halves["get"].append(middle - start)
        halves["put"].append(time.perf_counter() - middle)

    benchmark.pedantic(_without_gc(one_round), rounds=ROUNDS, iterations=1)
    return halves


def check_round_trip(name: str, variant: Variant) -> None:
    """Fail unless every vCPU reads back as seeded: each put loaded what its get took."""
    now, seeded = variant.machine.digests(), variant.machine.seeded
    wrong = sorted((i for i in seeded if now.get(i) != seeded[i]),
                   key=lambda i: int(i.split("/")[1]))
    assert len(now) == len(seeded) and not wrong, \
        f"{name}: {len(wrong)} of {len(seeded)} vCPUs read back changed, e.g. {wrong[:3]}"


def record(benchmark, results, count: int, name: str, halves: dict[str, list[float]]) -> None:
    """Fill ``extra_info``: the backend, per-vCPU times, and the ratio to devstate's pool."""
    backend, why = vcpu_backend()
    info = benchmark.extra_info
    info["backend"], info["backend_reason"] = str(backend), why
    median = median_s(benchmark)
    if median is None:  # benchmarks disabled: one round, not measured
        return
    info["per_vcpu_us"] = round(median / count * 1e6, 2)
    for half, seconds in halves.items():
        info[f"{half}_us_per_vcpu"] = round(statistics.median(seconds) / count * 1e6, 2)
    seen = results.setdefault(f"vcpus-{count}", {})
    seen[name] = median
    if POOL in seen:
        info["vs_devstate_pool"] = round(median / seen[POOL], 3)


@pytest.mark.parametrize("machines", [
    pytest.param(n, id=f"{n}-vcpus", marks=pytest.mark.benchmark(group=f"vcpus-{n}"))
    for n in COUNTS], indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
def test_get_put_vcpus(benchmark, results, machines, variant: str) -> None:
    """Get every vCPU, then put every one back: one side's stop-and-copy work, one way."""
    count, variants = machines
    halves = timed_rounds(benchmark, variants[variant])
    check_round_trip(variant, variants[variant])
    record(benchmark, results, count, variant, halves)
