"""The ``devstate`` command: ``demo``, ``migrate`` and ``vm``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from importlib import resources
from typing import Any

import uvloop

from devstate.config.params import MigrationParams, Overrun, Routing, Schedule
from devstate.config.spec import Backend, MachineConfig, load_spec
from devstate.devices import device_table
from devstate.errors import DevstateError, SpecError
from devstate.lifecycle import end_with_parent
from devstate.net.transport import TlsConfig
from devstate.planning.cost import CostHistory
from devstate.report.migration import MigrationReport, format_table
from devstate.report.progress import MigrationProgress, following, wanted

DEFAULT_MACHINE = "default.toml"


def default_workers() -> int:
    """One worker per usable CPU (affinity-aware), at least one."""
    return max(1, len(os.sched_getaffinity(0)))


def load_default_machine() -> MachineConfig:
    """The built-in default machine of ``devstate demo``."""
    with resources.as_file(resources.files("devstate.config.machines") / DEFAULT_MACHINE) as path:
        return load_spec(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devstate",
        description="Save and load a VM's device state concurrently during live migration.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="migrate the built-in default machine sequentially "
                                       "and concurrently, and compare the downtimes")
    demo.add_argument("--spec", help="machine spec (TOML or JSON) instead of the default")
    demo.add_argument("--workers", type=_positive, default=default_workers(),
                      help="workers per side in concurrent mode (default: usable CPUs)")
    demo.add_argument("--json", action="store_true", help="print one JSON object")

    migrate = sub.add_parser("migrate", help="migrate a machine once and report: to a "
                                             "destination it starts here, or --to one "
                                             "listening elsewhere")
    migrate.add_argument("--spec", required=True, help="machine spec (TOML or JSON)")
    migrate.add_argument("--to", metavar="URI", default=None,
                         help="a destination already listening (devstate vm --incoming): "
                              "unix:PATH or tcp:HOST:PORT; default: start one on this host")
    migrate.add_argument("--workers", type=_positive, default=None,
                         help="workers per side (default: usable CPUs; 1 with --sequential)")
    migrate.add_argument("--sequential", action="store_true",
                         help="one device after another, as VMMs do today")
    migrate.add_argument("--single-vm", action="store_true",
                         help="kvm: one VM in one worker, vCPUs on a thread per CPU, "
                              "instead of a VM per worker")
    migrate.add_argument("--channels", type=_positive, default=None,
                         help="data channels (default: one per worker)")
    migrate.add_argument("--routing", choices=[r.value for r in Routing],
                         default=Routing.AFFINITY.value,
                         help="affinity: a device's packets on its owner's channel; spread: "
                              "a stream's packets over every channel")
    migrate.add_argument("--max-bandwidth", type=_rate, default=None, metavar="RATE",
                         dest="bandwidth_limit",
                         help="bytes per second over all channels together, e.g. 100MiB")
    migrate.add_argument("--downtime-limit", type=_milliseconds, default=None, metavar="MS",
                         help="no switchover while the expected downtime is above this")
    migrate.add_argument("--on-overrun", choices=[o.value for o in Overrun],
                         default=Overrun.FINISH.value,
                         help="past the limit during stop-and-copy: finish and report the "
                              "overrun, or abort (the source resumes unchanged)")
    migrate.add_argument("--force-switchover", action="store_true",
                         help="switch over even when the limit is expected to be missed")
    migrate.add_argument("--precopy", action="store_true",
                         help="stream devices that support it while the VM runs; switch "
                              "over when the expected downtime meets --downtime-limit")
    migrate.add_argument("--spec-order", action="store_true",
                         help="baseline: devices in spec order, dealt round-robin, streams "
                              "moving in table order, instead of the plan (longest first)")
    _tls_arguments(migrate, server=False)
    migrate.add_argument("--json", action="store_true", help="print the report as JSON")

    report = sub.add_parser("report", help="draw the timeline of a finished migration from "
                                           "its JSON report (migrate --json, demo --json)")
    report.add_argument("file", metavar="FILE.json", help="the report")
    report.add_argument("--png", metavar="OUT.png", required=True,
                        help="where to write the picture")
    report.add_argument("--title", default=None, help="a title above the panels")

    vm = sub.add_parser("vm", help="host a machine's devices: a migration destination, or "
                                   "with --qmp a VM a migration controller drives")
    vm.add_argument("--spec", required=True, help="machine spec (TOML or JSON)")
    vm.add_argument("--qmp", metavar="unix:PATH",
                    help="serve QMP on this Unix socket (mode 0600): a controller written "
                         "for QEMU drives the VM; without --incoming it runs as a source")
    vm.add_argument("--incoming", metavar="URI",
                    help="where to listen for the migration: unix:PATH or tcp:HOST:PORT "
                         "(port 0: any free port; the 'ready' line names it); with --qmp "
                         "also 'defer' (wait for migrate-incoming)")
    vm.add_argument("--params", metavar="FILE.json", default=None,
                    help="every migration parameter as JSON, as a local migration's source "
                         "writes them for its destination (instead of the flags below)")
    vm.add_argument("--workers", type=_positive, default=None,
                    help="workers (default: usable CPUs; need not equal the source's)")
    vm.add_argument("--chunk-size", type=_chunk_size, default=None,
                    help="largest stream packet payload, e.g. 1MiB (at least the source's; "
                         "default 1MiB)")
    vm.add_argument("--cpus", type=_cpu_list, default=None,
                    help="comma-separated CPUs to pin workers to (default: usable CPUs)")
    vm.add_argument("--single-vm", action="store_true",
                    help="kvm: one VM in one worker, vCPUs put on a thread per CPU")
    vm.add_argument("--spec-order", action="store_true",
                    help="baseline: devices in spec order, dealt round-robin")
    _tls_arguments(vm, server=True)
    vm.add_argument("--once", action="store_true",
                    help="exit after one incoming migration instead of running the VM")
    vm.add_argument("--parent", type=int, default=None, metavar="PID",
                    help=argparse.SUPPRESS)  # started by a local migration: end with it
    vm.add_argument("--fault", default=None, type=_fault,
                    help=argparse.SUPPRESS)  # tests: arm a fault (devstate.worker.faults)
    return parser


def _tls_arguments(parser: argparse.ArgumentParser, *, server: bool) -> None:
    group = parser.add_argument_group("TLS (x509; every channel, when --tls-ca is given)")
    group.add_argument("--tls-ca", metavar="PEM",
                       help="CA certificate(s) that sign the peer's certificate")
    group.add_argument("--tls-cert", metavar="PEM",
                       help="our certificate chain" + (" (required)" if server
                                                       else " (for mutual TLS)"))
    group.add_argument("--tls-key", metavar="PEM", help="its private key, if not in --tls-cert")
    if server:
        group.add_argument("--tls-verify-client", action="store_true",
                           help="require a client certificate signed by --tls-ca")
    else:
        group.add_argument("--tls-hostname", metavar="NAME",
                           help="name to check in the destination's certificate "
                                "(default: the host of --to)")


def _tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS params the flags give, or None; usage errors for incomplete ones."""
    given = [flag for flag in ("tls_cert", "tls_key", "tls_hostname", "tls_verify_client")
             if getattr(args, flag, None)]
    if args.tls_ca is None:
        if given:
            raise DevstateError(f"--{given[0].replace('_', '-')} needs --tls-ca")
        return None
    if args.command == "vm" and not args.tls_cert:
        raise DevstateError("a TLS destination needs --tls-cert (and --tls-key)")
    return TlsConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                     hostname=getattr(args, "tls_hostname", None),
                     verify_client=getattr(args, "tls_verify_client", False))


def _rate(text: str) -> float:
    from devstate.config.fields import parse_quantity
    from devstate.errors import SpecError

    try:
        rate = parse_quantity(text, "--max-bandwidth")
    except SpecError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None
    if rate <= 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return float(rate)


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value


def _fault(text: str) -> str:
    from devstate.worker.faults import Armed

    try:
        Armed.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _chunk_size(text: str) -> int:
    from devstate.config.fields import parse_quantity
    from devstate.errors import SpecError

    try:
        size = parse_quantity(text, "--chunk-size")
    except SpecError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None
    if not 4096 <= size <= 64 << 20:
        raise argparse.ArgumentTypeError("must be between 4KiB and 64MiB")
    return size


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        cpus = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 0,1,2") from None
    usable = os.sched_getaffinity(0)
    bad = [c for c in cpus if c not in usable]
    if bad:
        raise argparse.ArgumentTypeError(f"CPU(s) {bad} are not usable here "
                                         f"(usable: {sorted(usable)})")
    return cpus


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``devstate`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "migrate" and args.sequential and args.precopy:
        parser.error("--precopy streams devices while others wait; --sequential saves one "
                     "device after another: they cannot go together")
    if args.command == "vm" and args.qmp is None and args.incoming in (None, "defer"):
        parser.error("devstate vm needs --incoming URI, or --qmp unix:PATH (with "
                     "--incoming defer, a URI, or neither for a source)")
    if args.command == "vm" and args.qmp is not None and not args.qmp.startswith("unix:"):
        parser.error("--qmp takes unix:PATH")
    if args.command == "vm" and args.params is not None and _vm_flags(args):
        parser.error(f"--params gives every migration parameter: drop "
                     f"{', '.join(_vm_flags(args))}")
    if args.command == "migrate" and args.sequential and (args.workers or 1) > 1:
        parser.error("--sequential saves and loads one device after another in one worker; "
                     "it cannot take --workers above 1")
    logging.basicConfig(level=logging.WARNING, format="devstate: %(name)s: %(message)s")
    command = {"demo": _demo, "migrate": _migrate, "vm": _vm, "report": _report}[args.command]
    try:
        return uvloop.run(_stoppable(command(args)))
    except DevstateError as exc:
        print(f"devstate: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if getattr(args, "parent", None) is None:  # a local destination ends quietly
            print("devstate: interrupted; everything it started was stopped", file=sys.stderr)
        return 130


async def _stoppable(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` so that SIGTERM unwinds it like Ctrl-C: every ``async with`` closes."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled():
            raise KeyboardInterrupt from None  # reported like Ctrl-C, after the clean-up
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
    report = await migrate_locally(spec, params, history=CostHistory(),
                                   progress=_progress(args, params))
    _status(args, f"{mode}: downtime {report.downtime_ms:.1f} ms")
    return report


def kvm_usable() -> tuple[bool, str]:
    """Whether real KVM vCPUs can be used here, and why (for the demo's choice of backend)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    try:
        from devstate.devices.kvm.device import host_record_bytes

        host_record_bytes()  # creates and probes a VM: the whole path a worker takes
    except DevstateError as exc:
        return False, f"/dev/kvm opened, but a VM could not be set up: {exc}"
    return True, "/dev/kvm opened and a VM with an in-kernel irqchip was set up"


def _demo_machine(args: argparse.Namespace) -> tuple[MachineConfig, str]:
    """The demo's machine: the default one on real KVM vCPUs when KVM works here."""
    if args.spec:
        spec = load_spec(args.spec)
        return spec, f"vCPU backend: {spec.vcpus.backend} (from {args.spec})"
    spec = load_default_machine()
    usable, why = kvm_usable()
    if usable:
        spec = dataclasses.replace(spec, vcpus=dataclasses.replace(spec.vcpus,
                                                                   backend=Backend.KVM))
    return spec, f"vCPU backend: {spec.vcpus.backend} ({why})"


async def _demo(args: argparse.Namespace) -> int:
    spec, backend = _demo_machine(args)
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
    schedule = Schedule.SEQUENTIAL if args.sequential else Schedule.CONCURRENT
    params = MigrationParams(workers=workers, schedule=schedule,
                        single_vm=args.single_vm, channels=args.channels,
                        routing=Routing(args.routing), bandwidth_limit=args.bandwidth_limit,
                        downtime_limit_ms=args.downtime_limit,
                        overrun=Overrun(args.on_overrun),
                        force_switchover=args.force_switchover, spec_order=args.spec_order,
                        precopy=args.precopy)
    tls = _tls_config(args)
    if args.to is None:
        if tls is not None:
            raise DevstateError("TLS needs --to: a destination started here uses a Unix "
                                "socket of its own")
        return _print(args, [await _run_mode(args, spec, params)])
    from devstate.migration.source import SourceVM
    from devstate.net.channels import parse_uri

    address = parse_uri(args.to)
    history = CostHistory()
    costs = history.load()
    progress = _progress(args, params)
    async with SourceVM(spec, params) as source:
        _status(args, f"migrating {spec.name} to {address} over {params.data_channels} "
                      f"channel(s){' with TLS' if tls else ''} ...")
        async with following(source, progress) if progress else contextlib.nullcontext():
            report = await source.migrate(address, tls=tls, compare_digests=True, costs=costs,
                                          on_status=progress.status if progress else None)
    if source.last_estimate is not None:
        history.save_run(costs, source.last_estimate, report.downtime_ms)
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
    return 0 if all(r.verified for r in reports) else 2


async def _report(args: argparse.Namespace) -> int:
    from devstate.report.timeline import draw_timeline, load_reports

    draw_timeline(load_reports(args.file), args.png, title=args.title)
    print(f"devstate: timeline of {args.file} written to {args.png}", file=sys.stderr)
    return 0


async def _vm(args: argparse.Namespace) -> int:
    from devstate.migration.destination import IncomingVM
    from devstate.net.channels import Listener, parse_uri

    if args.parent is not None:
        # A destination started by a local migration: SIGTERM (clean unwind) if it dies.
        end_with_parent(args.parent, signal.SIGTERM)
    spec = load_spec(args.spec)
    tls = _tls_config(args)
    params = _vm_params(args)
    if args.qmp is not None:
        return await _vm_qmp(args, spec, params, tls)
    listener = Listener(parse_uri(args.incoming))
    async with IncomingVM(spec, params) as vm:
        listener.open()
        try:
            print(f"ready {listener.address}", flush=True)
            result = await vm.accept_migration(listener, tls)
            if not result.completed:
                print(f"devstate: incoming migration failed: {result.reason}", file=sys.stderr)
                return 1
            if not args.once:
                await asyncio.Event().wait()  # the VM runs until the process is stopped
        finally:
            listener.close()
    return 0


def _vm_flags(args: argparse.Namespace) -> list[str]:
    """The parameter flags given to ``devstate vm``."""
    given = {"--workers": args.workers, "--chunk-size": args.chunk_size, "--cpus": args.cpus,
             "--single-vm": args.single_vm or None, "--spec-order": args.spec_order or None,
             "--fault": args.fault}
    return [flag for flag, value in given.items() if value is not None]


def _vm_params(args: argparse.Namespace) -> MigrationParams:
    """``devstate vm``'s parameters: the --params file whole, or the flags."""
    if args.params is not None:
        try:
            with open(args.params, encoding="utf-8") as file:
                return MigrationParams.from_json(json.load(file))
        except (OSError, ValueError) as exc:
            raise SpecError("", f"cannot read --params {args.params}: {exc}") from exc
    return MigrationParams(workers=args.workers or default_workers(), cpus=args.cpus,
                           chunk_bytes=args.chunk_size or MigrationParams().chunk_bytes,
                           single_vm=args.single_vm, spec_order=args.spec_order,
                           fault=args.fault)


async def _vm_qmp(args: argparse.Namespace, spec: MachineConfig, params: MigrationParams,
                  tls: TlsConfig | None) -> int:
    """``devstate vm --qmp``: the VM runs until a controller says ``quit`` (or SIGTERM)."""
    from devstate.qmp.controller import Controller
    from devstate.qmp.server import QmpServer

    path = args.qmp.removeprefix("unix:")
    server: QmpServer | None = None

    def emit(event: str, data: dict[str, Any]) -> None:
        if server is not None:
            server.emit(event, data)

    async with Controller(spec, params, incoming=args.incoming, emit=emit,
                          tls=tls) as controller:
        server = QmpServer(controller.commands())
        async with server:
            await server.start(path)
            print(f"qmp unix:{path}", flush=True)
            if controller.ready is not None:
                print(f"ready {controller.ready}", flush=True)
            await controller.quitting.wait()
    return 0
