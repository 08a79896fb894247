"""The fault matrix: every step of a migration, every fault, and who runs the VM after.

Each cell arms one fault (devstate.worker.faults) on one side; it strikes when that side's code
reaches the step, never after a sleep. A cell checks that:

* exactly one side runs the VM, or none when the fault destroyed state the VM needs (a
  source worker or device model is where the only copy of its devices' state lives) and
  never both: the source's ``running`` against the destination process's exit code (0 only
  once it took the migration and resumed);
* the side that runs has its state unchanged (every digest as before the migration);
* the error names what failed;
* nothing is left behind: no process, no arena in /dev/shm (the autouse ``no_leaks``), no
  fd, no thread in this process (``no_fd_or_thread_leaks``).

Bounds: a cell fails if its migration has not ended within ``CELL_TIMEOUT_S``; a lost
worker is found by its sentinel at once, a closed or cut channel by EOF or EPIPE, and the
destination exits within ``devstate.migration.local.DEST_EXIT_TIMEOUT_S`` of the end.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from devstate.config.params import MigrationParams, Overrun
from devstate.config.spec import MachineConfig, parse_spec
from devstate.errors import DowntimeOverrun, MigrationFailed
from devstate.migration.local import destination
from devstate.migration.source import SourceVM

# 26 real-process migrations with faults: about half a minute
pytestmark = pytest.mark.slow

CELL_TIMEOUT_S = 60.0

# Two streams of 8 one-MiB chunks and 16 vCPUs over 2 workers a side: every step of a
# migration happens on both workers. nic0 supports precopy (the precopy cells use it).
MACHINE = parse_spec({"seed": 8, "vcpus": {"count": 16}, "devices": [
    {"name": "nic0", "size": "8MiB", "firmware_latency_ms": 20, "precopy": True},
    {"name": "gpu0", "size": "8MiB", "firmware_latency_ms": 20}]})

SOURCE, NEITHER = "source", "neither"


@dataclass(frozen=True)
class Cell:
    """One fault at one step, and what must follow."""

    side: str        # where the fault is armed: "source" or "dest"
    fault: str       # devstate.worker.faults point:fault[:skip]
    runs: str        # who runs the VM after: SOURCE or NEITHER
    says: str        # words the error must contain
    precopy: bool = False

    @property
    def id(self) -> str:
        return f"{self.side}-{self.fault.replace(':', '-')}" + ("-precopy" if self.precopy else "")


# The source holds the only copy of its devices' state: a source worker or source device
# model that dies takes part of the VM with it (NEITHER), as a crashed VMM does. Every
# destination fault before the destination resumes leaves the source to resume.
CELLS = [
    # setup: channels open, before the stop
    Cell("source", "setup:kill-worker", NEITHER, "worker"),
    Cell("source", "setup:cut-channels", SOURCE, "source resumed"),
    Cell("dest", "setup:kill-worker", SOURCE, "source resumed"),
    Cell("dest", "setup:cut-channels", SOURCE, "source resumed"),
    # precopy: the VM still runs
    Cell("source", "precopy:kill-worker", NEITHER, "worker", precopy=True),
    Cell("source", "precopy:kill-model", NEITHER, "vfio/nic0", precopy=True),
    Cell("source", "precopy:cut-channels", SOURCE, "source resumed", precopy=True),
    Cell("dest", "put:kill-model", SOURCE, "vfio/nic0", precopy=True),
    # get: the VM stopped, devices read
    Cell("source", "get:kill-worker", NEITHER, "worker"),
    Cell("source", "get:kill-model", NEITHER, "vfio/"),
    Cell("source", "get:cut-channels", SOURCE, "source resumed"),
    # transfer: packets on the wire
    Cell("source", "send:kill-worker:4", NEITHER, "worker"),
    Cell("source", "send:cut-channels:4", SOURCE, "source resumed"),
    Cell("source", "send:corrupt:4", SOURCE, "checksum"),
    Cell("source", "send:truncate:4", SOURCE, "source resumed"),
    # put: the destination writes devices
    Cell("dest", "put:kill-worker", SOURCE, "source resumed"),
    Cell("dest", "put:kill-model", SOURCE, "vfio/"),
    Cell("dest", "put:cut-channels", SOURCE, "source resumed"),
    # complete: firmware load
    Cell("dest", "complete:kill-worker", SOURCE, "source resumed"),
    Cell("dest", "complete:kill-model", SOURCE, "vfio/"),
    # acknowledgement: after COMMIT, the destination's resume fails
    Cell("dest", "resume:kill-worker", SOURCE, "resume after commit failed"),
]


async def _migrate(spec: MachineConfig, source_params: MigrationParams,
                   dest_params: MigrationParams,
                   on_status: Any = None, dest_spec: MachineConfig | None = None
                   ) -> dict[str, Any]:
    """One migration (bounded by CELL_TIMEOUT_S); who ran the VM after, and the error."""
    outcome: dict[str, Any] = {}
    async with SourceVM(spec, source_params) as source, \
            destination(dest_spec or spec, dest_params) as dest:
        before = await source.digests()
        try:
            async with asyncio.timeout(CELL_TIMEOUT_S):
                outcome["report"] = await source.migrate(
                    dest.address, compare_digests=True,
                    on_status=on_status(asyncio.current_task()) if on_status else None)
        except (MigrationFailed, DowntimeOverrun) as exc:
            outcome["error"] = exc
        except asyncio.CancelledError:
            outcome["error"] = "cancelled"
        outcome["running"] = source.running
        if source.running:
            outcome["unchanged"] = await source.digests() == before
    outcome["dest_ran"] = dest.returncode == 0
    return outcome


def _check(outcome: dict[str, Any], runs: str, says: str) -> None:
    error = outcome.get("error")
    assert error is not None, "the migration completed despite the fault"
    assert says in str(error) or says in str(error.__cause__ if error != "cancelled"
                                             else ""), f"error does not say {says!r}: {error}"
    assert not (outcome["running"] and outcome["dest_ran"]), "both sides run the VM"
    assert not outcome["dest_ran"], "the destination ran a VM whose migration failed"
    if runs == SOURCE:
        assert outcome["running"], f"the source did not resume: {error}"
        assert outcome["unchanged"], "the source resumed with changed state"
    else:
        assert not outcome["running"], "the source claims to run with devices it lost"


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_fault(run, no_fd_or_thread_leaks, cell: Cell) -> None:
    armed = MigrationParams(workers=2, fault=cell.fault, precopy=cell.precopy)
    plain = MigrationParams(workers=2, precopy=cell.precopy)
    source, dest = (armed, plain) if cell.side == "source" else (plain, armed)
    _check(run(_migrate(MACHINE, source, dest)), cell.runs, cell.says)


INCOMPATIBLE = parse_spec({"seed": 8, "vcpus": {"count": 16}, "devices": [
    {"name": "nic0", "size": "4MiB"}, {"name": "gpu0", "size": "8MiB"}]})


def test_destination_refusing_an_incompatible_spec(run, no_fd_or_thread_leaks) -> None:
    """setup: the destination's device table differs: refused before the stop."""
    outcome = run(_migrate(MACHINE, MigrationParams(workers=2), MigrationParams(workers=2),
                           dest_spec=INCOMPATIBLE))
    _check(outcome, SOURCE, "vfio/nic0")


SLOW = parse_spec({"seed": 8, "vcpus": {"count": 16}, "devices": [
    {"name": "nic0", "size": "32MiB", "write_bandwidth": "64MiB/s"}]})


def test_deadline_overrun_with_abort(run, no_fd_or_thread_leaks) -> None:
    """stop-and-copy: 32 MiB at 64 MiB/s cannot fit 100 ms; abort: the source resumes."""
    params = MigrationParams(workers=2, downtime_limit_ms=100, overrun=Overrun.ABORT,
                        force_switchover=True)
    outcome = run(_migrate(SLOW, params, MigrationParams(workers=2)))
    _check(outcome, SOURCE, "downtime limit")


def _cancel_at(status: str) -> Any:
    def watcher(task: asyncio.Task[Any]) -> Any:
        def on_status(seen: str) -> None:
            if seen == status:
                task.cancel()  # delivered at the migration's next await
        return on_status
    return watcher


@pytest.mark.parametrize("status", ["setup", "active", "device"])
def test_cancel(run, no_fd_or_thread_leaks, status: str) -> None:
    """Cancelled at each status: the source resumes unchanged, the destination discards."""
    outcome = run(_migrate(MACHINE, MigrationParams(workers=2), MigrationParams(workers=2),
                           on_status=_cancel_at(status)))
    _check(outcome, SOURCE, "cancelled")
