"""A migration on one host: the destination as a second OS process, joined by Unix sockets.

Runs in: the process of ``devstate migrate`` / ``devstate demo`` (the source coordinator).
The destination is ``devstate vm --incoming URI --once`` started as a child process with
the same spec; it prints one ``ready URI`` line when it listens. Both
sides start their pools at the same time, before the VM stops. On every exit path the
destination is waited for, and terminated if it does not finish on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from devstate.config.params import MigrationParams
from devstate.config.spec import MachineConfig
from devstate.errors import DevstateError
from devstate.migration.guest import check_room
from devstate.migration.source import SourceVM
from devstate.net import channels
from devstate.net.tls import TlsConfig
from devstate.planning.cost import CostHistory, HostCosts
from devstate.report.migration import MigrationReport
from devstate.report.progress import MigrationProgress, following

# The destination imports numpy and starts its own pool: a few seconds at most.
DEST_READY_TIMEOUT_S = 60.0
DEST_EXIT_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Destination:
    """A running destination process, the address it listens on, and once it has exited
    its exit code (0: it took the migration and ran the VM; 1: the migration failed)."""

    address: channels.Address
    pid: int
    returncode: int | None = None


@contextlib.asynccontextmanager
async def destination(spec: MachineConfig, params: MigrationParams, *,
                      incoming: str | None = None, tls: TlsConfig | None = None,
                      prefix: Sequence[str] = ()) -> AsyncIterator[Destination]:
    """Run a destination process for ``spec`` with ``params`` (its workers pinned to
    :func:`dest_cpus`); yield where it listens and its pid.

    ``incoming`` is the URI to listen on (default: a Unix socket in a private directory;
    ``tcp:HOST:0`` takes a free port, reported back); ``tls`` its certificate and key
    (and ``verify_client``); ``prefix`` runs it under another command, e.g.
    ``ip netns exec NS``.
    """
    with tempfile.TemporaryDirectory(prefix="devstate-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec.to_dict()))
        # The destination's parameters travel whole, in one serialised form: a field added
        # to MigrationParams reaches it with nobody having to pass it on.
        params_path = Path(tmp) / "params.json"
        ours = dataclasses.replace(params, cpus=tuple(dest_cpus(params)))
        params_path.write_text(json.dumps(ours.to_json()))
        uri = incoming or f"unix:{Path(tmp) / 'incoming.sock'}"
        args = [*prefix, sys.executable, "-m", "devstate", "vm", "--spec", str(spec_path),
                "--incoming", uri, "--params", str(params_path), "--once",
                *(tls_arguments(tls, server=True) if tls else []),
                "--parent", str(os.getpid())]
        # A process group of its own: Ctrl-C at the terminal reaches only the source, which
        # then ends the destination in order (below) instead of both racing to tear down.
        # Not a session of its own: Linux's autogroup scheduler shares the CPUs between
        # sessions first and between threads only within one, so the destination's put
        # threads took half of each CPU from the source's get threads that feed them
        # (docs/benchmarks.md, "A live guest"). setpgid runs in the child before exec
        # (uvloop has no process_group=).
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=os.setpgrp)
        try:
            address = await _wait_ready(proc)
            dest = Destination(address, proc.pid)
            yield dest
            async with asyncio.timeout(DEST_EXIT_TIMEOUT_S):
                dest.returncode = await proc.wait()
        finally:
            await _reap(proc)


def tls_arguments(tls: TlsConfig, *, server: bool) -> list[str]:
    """``devstate`` command-line flags that give a process ``tls``."""
    args = ["--tls-ca", tls.ca]
    if tls.cert:
        args += ["--tls-cert", tls.cert]
    if tls.key:
        args += ["--tls-key", tls.key]
    if server and tls.verify_client:
        args.append("--tls-verify-client")
    if not server and tls.hostname:
        args += ["--tls-hostname", tls.hostname]
    return args


def dest_cpus(params: MigrationParams) -> list[int]:
    """The destination's CPUs: the source's in reverse, so first workers do not collide."""
    return list(reversed(params.cpus or sorted(os.sched_getaffinity(0))))


async def _wait_ready(proc: asyncio.subprocess.Process) -> channels.Address:
    """Wait for the ``ready URI`` line; return the address the destination listens on."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(DEST_READY_TIMEOUT_S):
            line = await proc.stdout.readline()
    except TimeoutError:
        raise DevstateError(f"destination did not get ready within "
                            f"{DEST_READY_TIMEOUT_S:.0f} s") from None
    word, _, uri = line.decode(errors="replace").strip().partition(" ")
    if word != "ready":
        await proc.wait()
        raise DevstateError(f"destination failed to start (exit code {proc.returncode}); "
                            "its error is above")
    return channels.parse_uri(uri)


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


async def migrate_locally(spec: MachineConfig, params: MigrationParams, *,
                          dest_params: MigrationParams | None = None,
                          compare_digests: bool = True,
                          history: CostHistory | None = None,
                          progress: MigrationProgress | None = None) -> MigrationReport:
    """Start both sides, migrate once, and return the report (both sides shut down after).

    The destination runs with ``dest_params`` (default: the source's). With ``history``
    the cost model starts from this host's stored constants and learns from the run
    (unless the history says not to, or the run is capped: :meth:`CostHistory.save_run`);
    with ``progress`` a live display follows the migration. The estimate counts the
    bandwidth cap of ``params``, if any.
    """
    check_room(spec, sides=2)  # once, here, before either side starts
    source = SourceVM(spec, params)
    costs = (history.load() if history else HostCosts()).capped(params)
    try:
        async with destination(spec, dest_params or params) as dest:
            await source.start()
            async with following(source, progress) if progress else contextlib.nullcontext():
                report = await source.migrate(
                    dest.address, compare_digests=compare_digests, costs=costs,
                    on_status=progress.status if progress else None)
    finally:
        await source.close()
    if history and source.last_estimate:
        history.save_run(costs, source.last_estimate, report.downtime_ms)
    return report
