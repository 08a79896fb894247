"""The ``devstate`` command: ``demo``, ``migrate``, ``report``, ``vm`` and ``costs``.

Runs in: the process a person or a script starts; it starts the pools (and, for a local
migration, the destination process) and ends them on every exit, Ctrl-C and SIGTERM
included. Exit statuses are :class:`devstate.cli.exits.Exit`'s; with ``--json`` a failure
is also a JSON object on standard output, ``{"error": {"class": ..., "desc": ...}}`` (QMP's
error shape), so a script reading stdout always gets JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import uvloop

from devstate.cli import startup
from devstate.cli.costs import costs_command, history
from devstate.cli.exits import Exit, status_of
from devstate.cli.fds import ensure_open_files
from devstate.cli.machines import default_workers, demo_machine
from devstate.cli.parser import parse_args, tls_config, vcpu_params
from devstate.cli.vm import vm_command
from devstate.config.params import MigrationParams, Overrun, Routing, Schedule
from devstate.config.spec import MachineConfig, load_spec
from devstate.devices import device_table
from devstate.errors import DevstateError
from devstate.report.migration import MigrationReport, format_table
from devstate.report.progress import MigrationProgress, following, wanted


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C but told apart in the exit status (143, not 130)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``devstate`` console script."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="devstate: %(name)s: %(message)s")
    command = {"demo": _demo, "migrate": _migrate, "vm": vm_command,
               "report": _report, "costs": costs_command}[args.command]
    try:
        startup.ready()
        return uvloop.run(_stoppable(command(args)))
    except DevstateError as exc:
        if isinstance(exc.__context__, asyncio.CancelledError):
            # Ctrl-C landed where the command could only end in an error of its own (after
            # a migration's COMMIT: the destination runs the VM, the source stays stopped):
            # said as that error, counted as the interruption it was.
            return _failed(args, exc, f"interrupted: {exc}", Exit.INTERRUPTED)
        return _failed(args, exc, f"error: {exc}", Exit.ERROR)
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        status = Exit.TERMINATED if isinstance(exc, Terminated) else Exit.INTERRUPTED
        if getattr(args, "parent", None) is not None:
            return status  # a local destination ends quietly: its source says why
        return _failed(args, exc, f"{how}; everything it started was stopped", status)
    finally:
        startup.done()


def _failed(args: argparse.Namespace, exc: BaseException, said: str, status: Exit) -> int:
    """Say why the command failed (and with --json, as a JSON object on stdout)."""
    print(f"devstate: {said}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": {"class": type(exc).__name__,
                                    "desc": str(exc) or said}}, indent=1))
    return status


async def _stoppable(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` so that SIGTERM unwinds it like Ctrl-C: every ``async with`` closes."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled():
            # Reported like Ctrl-C, after the clean-up.
            raise (Terminated if terminated else KeyboardInterrupt) from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _progress(args: argparse.Namespace, params: MigrationParams) -> MigrationProgress | None:
    """A live display of the migration, when a person is watching (see devstate.report.progress)."""
    if not wanted(getattr(args, "json", False)):
        return None
    return MigrationProgress(params.downtime_limit_ms)


def _status(args: argparse.Namespace, text: str) -> None:
    # Progress on long work, for a person at a terminal; silent for --json or a pipe.
    if not getattr(args, "json", False) and sys.stderr.isatty():
        print(f"devstate: {text}", file=sys.stderr, flush=True)


async def _run_mode(args: argparse.Namespace, spec: MachineConfig,
                    params: MigrationParams) -> MigrationReport:
    from devstate.migration.local import migrate_locally

    mode = params.schedule
    _status(args, f"migrating {spec.name} ({len(device_table(spec))} devices), {mode}, "
                  f"{params.workers} worker(s) per side ...")
    report = await migrate_locally(spec, params, history=history(args),
                                   progress=_progress(args, params))
    _status(args, f"{mode}: downtime {report.downtime_ms:.1f} ms")
    return report


async def _demo(args: argparse.Namespace) -> int:
    spec, backend = demo_machine(args)
    ensure_open_files(spec, args.workers)
    if not args.json:
        print(backend)
    reports = [
        await _run_mode(args, spec, MigrationParams(workers=1, schedule=Schedule.SEQUENTIAL)),
        await _run_mode(args, spec, MigrationParams(workers=args.workers)),
    ]
    return _print(args, reports, extra={"vcpu_backend": str(spec.vcpus.backend),
                                        "vcpu_backend_reason": backend})


async def _migrate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    workers = args.workers or (1 if args.sequential else default_workers())
    ensure_open_files(spec, workers)
    schedule = Schedule.SEQUENTIAL if args.sequential else Schedule.CONCURRENT
    params = MigrationParams(workers=workers, schedule=schedule,
                        channels=args.channels, **vcpu_params(args),
                        routing=Routing(args.routing), bandwidth_limit=args.bandwidth_limit,
                        downtime_limit_ms=args.downtime_limit, peer_timeout_s=args.peer_timeout,
                        overrun=Overrun(args.on_overrun),
                        force_switchover=args.force_switchover, spec_order=args.spec_order,
                        precopy=args.precopy, auto_converge=args.auto_converge)
    tls = tls_config(args)
    if args.to is None:
        if tls is not None:
            raise DevstateError("TLS needs --to: a destination started here uses a Unix "
                                "socket of its own")
        return _print(args, [await _run_mode(args, spec, params)])
    from devstate.migration.source import SourceVM
    from devstate.net.channels import parse_uri

    address = parse_uri(args.to)
    learned = history(args)
    costs = learned.load().capped(params)
    progress = _progress(args, params)
    async with SourceVM(spec, params) as source:
        _status(args, f"migrating {spec.name} to {address} over {params.data_channels} "
                      f"channel(s){' with TLS' if tls else ''} ...")
        async with following(source, progress) if progress else contextlib.nullcontext():
            report = await source.migrate(address, tls=tls, compare_digests=True, costs=costs,
                                          on_status=progress.status if progress else None)
    if source.last_estimate is not None:
        learned.save_run(costs, source.last_estimate, report.downtime_ms)
    return _print(args, [report])


def _print(args: argparse.Namespace, reports: list[MigrationReport],
           extra: dict[str, Any] | None = None) -> int:
    if args.json:
        out: dict[str, Any]
        if len(reports) == 1:
            out = reports[0].to_json()
        else:
            out = {r.mode: r.to_json() for r in reports}
            out["speedup"] = round(reports[0].downtime_ms / reports[1].downtime_ms, 3)
        out.update(extra or {})
        print(json.dumps(out, indent=1))
    else:
        print(format_table(reports), end="")
    return status_of(reports)


async def _report(args: argparse.Namespace) -> int:
    from devstate.report.timeline import draw_timeline, load_reports

    draw_timeline(load_reports(args.file), args.out, title=args.title)
    print(f"devstate: timeline of {args.file} written to {args.out}", file=sys.stderr)
    return Exit.OK
