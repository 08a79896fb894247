"""A migration on one host: the destination as a second OS process, joined by Unix sockets.

Runs in: the process of ``devstate migrate`` / ``devstate demo`` (the source coordinator).
The destination is ``devstate vm --incoming unix:PATH --once`` started as a child process
with the same spec and worker count; it prints one ``ready`` line when it listens. Both
sides start their pools at the same time, before the VM stops. On every exit path the
destination is waited for, and terminated if it does not finish on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from devstate import channels
from devstate.errors import DevstateError
from devstate.report import MigrationReport
from devstate.settings import Settings
from devstate.source import SourceVM
from devstate.spec import MachineSpec

# The destination imports numpy and starts its own pool: a few seconds at most.
DEST_READY_TIMEOUT_S = 60.0
DEST_EXIT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Destination:
    """A running destination process and the address it listens on."""

    address: channels.Address
    pid: int


@contextlib.asynccontextmanager
async def destination(spec: MachineSpec, settings: Settings) -> AsyncIterator[Destination]:
    """Run a destination process for ``spec``; yield where it listens and its pid."""
    with tempfile.TemporaryDirectory(prefix="devstate-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec.to_dict()))
        address = channels.Address("unix", str(Path(tmp) / "incoming.sock"))
        args = [sys.executable, "-m", "devstate", "vm", "--spec", str(spec_path),
                "--incoming", str(address), "--workers", str(settings.workers), "--once",
                "--cpus", ",".join(map(str, dest_cpus(settings))),
                "--chunk-size", str(settings.chunk_bytes),
                *(["--single-vm"] if settings.single_vm else []),
                "--parent", str(os.getpid())]
        # A session of its own: Ctrl-C at the terminal reaches only the source, which then
        # ends the destination in order (below) instead of both racing to tear down.
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            await _wait_ready(proc)
            yield Destination(address, proc.pid)
            async with asyncio.timeout(DEST_EXIT_TIMEOUT_S):
                await proc.wait()
        finally:
            await _reap(proc)


def dest_cpus(settings: Settings) -> list[int]:
    """The destination's CPUs: the source's in reverse, so first workers do not collide."""
    return list(reversed(settings.cpus or sorted(os.sched_getaffinity(0))))


async def _wait_ready(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(DEST_READY_TIMEOUT_S):
            line = await proc.stdout.readline()
    except TimeoutError:
        raise DevstateError(f"destination did not get ready within "
                            f"{DEST_READY_TIMEOUT_S:.0f} s") from None
    if line.strip() != b"ready":
        await proc.wait()
        raise DevstateError(f"destination failed to start (exit code {proc.returncode}); "
                            "its error is above")


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(DEST_EXIT_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def migrate_locally(spec: MachineSpec, settings: Settings, *,
                          compare_digests: bool = True) -> MigrationReport:
    """Start both sides, migrate once, and return the report (both sides shut down after)."""
    source = SourceVM(spec, settings)
    try:
        async with destination(spec, settings) as dest:
            await source.start()
            return await source.migrate(dest.address, compare_digests=compare_digests)
    finally:
        await source.close()
