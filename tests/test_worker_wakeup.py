"""A worker's event loop and owner threads ask for a short time slice; nothing they start
inherits it.

Read from the kernel's own account of each thread (``/proc/<pid>/task/<tid>/sched``), not
from devstate: the loop thread of every worker has the 100 us slice, and a running guest's
vCPU threads in its owner have the default.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from devstate.cli import kvm_usable
from devstate.config.params import MigrationParams
from devstate.config.spec import parse_spec
from devstate.migration.source import SourceVM
from devstate.worker.wakeup import LOOP_SLICE_NS, prefer_wakeups

USABLE, WHY = kvm_usable()


def _slice(task: Path) -> int | None:
    for line in (task / "sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split()[-1])
    return None


def _custom_slices() -> bool:
    """Whether this kernel takes a custom slice (Linux 6.12+), tried on a throwaway thread."""
    took: list[bool] = []

    def probe() -> None:
        took.append(prefer_wakeups() and
                    _slice(Path(f"/proc/self/task/{threading.get_native_id()}"))
                    == LOOP_SLICE_NS)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return took[0]


@pytest.mark.skipif(not USABLE, reason=f"needs KVM: {WHY}")
def test_only_each_workers_loop_thread_has_the_short_slice(run) -> None:
    if not _custom_slices():
        pytest.skip("this kernel has no custom time slices (sched_attr.sched_runtime, "
                    "Linux 6.12+)")
    spec = parse_spec({"seed": 3, "vcpus": {"count": 4, "backend": "kvm"},
                       "ram": {"size": "4MiB"}})

    async def threads_of_workers() -> dict[int, dict[int, tuple[str, int | None]]]:
        async with SourceVM(spec, MigrationParams(workers=2)) as source:
            return {pid: {int(task.name): ((task / "comm").read_text().strip(), _slice(task))
                          for task in Path(f"/proc/{pid}/task").iterdir()}
                    for pid in source.pool.pids}

    workers = run(threads_of_workers())
    assert len(workers) == 2
    others = []
    for pid, threads in workers.items():
        assert threads[pid][1] == LOOP_SLICE_NS, threads[pid]  # the main thread: the loop
        others += [t for tid, t in threads.items() if tid != pid]
    vcpus = [t for t in others if t[0].startswith("vcpu/")]
    assert len(vcpus) == 4, others  # the running guest's threads, in its owner
    assert all(s != LOOP_SLICE_NS for _, s in others), others


def test_threads_and_processes_a_loop_starts_have_the_default_slice() -> None:
    """The short slice is the asking thread's alone: a thread it starts, and a process it
    forks, begin with the kernel's default."""
    if not _custom_slices():
        pytest.skip("this kernel has no custom time slices (sched_attr.sched_runtime, "
                    "Linux 6.12+)")
    seen: dict[str, int | None] = {}

    def loop() -> None:
        assert prefer_wakeups()
        seen["loop"] = _slice(Path(f"/proc/self/task/{threading.get_native_id()}"))
        child = threading.Thread(target=lambda: seen.update(
            thread=_slice(Path(f"/proc/self/task/{threading.get_native_id()}"))))
        child.start()
        child.join()
        forked = subprocess.run(["cat", "/proc/self/sched"], capture_output=True, text=True,
                                check=True).stdout
        seen["process"] = next(int(line.split()[-1]) for line in forked.splitlines()
                               if line.startswith("se.slice"))

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    assert seen["loop"] == LOOP_SLICE_NS
    assert seen["thread"] != LOOP_SLICE_NS and seen["process"] != LOOP_SLICE_NS, seen
