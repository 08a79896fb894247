"""The ``devstate`` command line: subcommands, their flags, and the checks across flags."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from devstate.cli.machines import default_workers
from devstate.config.fields import parse_quantity
from devstate.config.params import MigrationParams, Overrun, Readback, Routing
from devstate.errors import DevstateError, SpecError
from devstate.net.tls import TlsConfig
from devstate.net.transport import HELLO_TIMEOUT_S


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``devstate``'s command line; usage errors exit with status 2, as argparse's."""
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
    if args.command == "vm" and args.params is not None and vm_flags(args):
        parser.error(f"--params gives every migration parameter: drop "
                     f"{', '.join(vm_flags(args))}")
    if args.command == "migrate" and args.sequential and (args.workers or 1) > 1:
        parser.error("--sequential saves and loads one device after another in one worker; "
                     "it cannot take --workers above 1")
    return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devstate",
        description="Save and load a VM's device state concurrently during live migration.",
        epilog="exit status: 0 done (verified), 1 error, 2 usage error, 3 migrated but not "
               "verified, 130 Ctrl-C, 143 SIGTERM")
    parser.add_argument("--version", action="version",
                        version=f"devstate {metadata.version('devstate')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_arguments(sub)
    _migrate_arguments(sub)
    _report_arguments(sub)
    _vm_arguments(sub)
    _costs_arguments(sub)
    return parser


def _cost_model_arguments(parser: argparse.ArgumentParser, *, learning: bool) -> None:
    """Which learned cost model a command uses (docs/costs.md), and whether it learns."""
    parser.add_argument("--costs", metavar="PATH", default=None,
                        help="the learned cost model's file (default: $DEVSTATE_COSTS, else "
                             "~/.cache/devstate/costs-v2-HOST.json, shared by every run)")
    if learning:
        parser.add_argument("--no-learn", action="store_true",
                            help="use the cost model without updating it from this run")


def _demo_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``devstate demo``'s flags."""
    demo = sub.add_parser("demo", help="migrate the built-in default machine sequentially "
                                       "and concurrently, and compare the downtimes")
    demo.add_argument("--spec", help="machine spec (TOML or JSON) instead of the default")
    demo.add_argument("--workers", type=_positive, default=default_workers(),
                      help="workers per side in concurrent mode (default: usable CPUs)")
    _cost_model_arguments(demo, learning=True)
    demo.add_argument("--json", action="store_true", help="print one JSON object")


def _migrate_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``devstate migrate``'s flags."""
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
    _vcpu_arguments(migrate)
    migrate.add_argument("--channels", type=_positive, default=None,
                         help="data channels (default: one per worker)")
    migrate.add_argument("--routing", choices=[r.value for r in Routing],
                         default=Routing.AFFINITY.value,
                         help="affinity: a device's packets on its owner's channel; spread: "
                              "a stream's packets over every channel")
    migrate.add_argument("--max-bandwidth", type=_rate, default=None, metavar="RATE",
                         dest="bandwidth_limit",
                         help="cap on all channels together, e.g. 100MiB/s, 1GB/s; a bare "
                              "number is bytes/s, as QEMU's max-bandwidth (virsh "
                              "migrate-setspeed takes MiB/s). Each channel gets an even "
                              "share: with affinity routing one device moves at "
                              "RATE/channels at most (--routing spread: all of RATE)")
    migrate.add_argument("--downtime-limit", type=_milliseconds, default=None, metavar="MS",
                         help="no switchover while the expected downtime is above this")
    migrate.add_argument("--peer-timeout", type=float, default=None, metavar="S",
                         help="give up on a peer silent this long during the migration "
                              "(default: 10 x the downtime limit or estimate, 5-60 s)")
    migrate.add_argument("--on-overrun", choices=[o.value for o in Overrun],
                         default=Overrun.FINISH.value,
                         help="past the limit during stop-and-copy: finish and report the "
                              "overrun, or abort (the source resumes unchanged)")
    migrate.add_argument("--force-switchover", action="store_true",
                         help="switch over even when the limit is expected to be missed")
    migrate.add_argument("--precopy", action="store_true",
                         help="stream VFIO devices that support it while the VM runs; switch "
                              "over when the expected downtime meets --downtime-limit (a "
                              "live guest's RAM is always precopied)")
    migrate.add_argument("--auto-converge", action="store_true",
                         help="a live guest whose RAM precopy does not converge is slowed: "
                              "its vCPUs kept stopped 20%%, then 10%% more per round")
    migrate.add_argument("--spec-order", action="store_true",
                         help="baseline: devices in spec order, dealt round-robin, streams "
                              "moving in table order, instead of the plan (longest first)")
    _tls_arguments(migrate, server=False)
    _cost_model_arguments(migrate, learning=True)
    migrate.add_argument("--json", action="store_true",
                         help="print the report as JSON (on failure: {\"error\": {\"class\", "
                              "\"desc\"}})")


def _report_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``devstate report``'s flags."""
    report = sub.add_parser("report", help="draw the timeline of a finished migration from "
                                           "its JSON report (migrate --json, demo --json)")
    report.add_argument("file", metavar="FILE.json", help="the report")
    report.add_argument("-o", "--out", "--png", dest="out", metavar="OUT.{png,svg,pdf}",
                        required=True,
                        help="where to write the picture, in the format its suffix names")
    report.add_argument("--title", default=None, help="a title above the panels")


def _vm_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``devstate vm``'s flags."""
    vm = sub.add_parser("vm", help="host a machine's devices: a migration destination, or "
                                   "with --qmp a VM a migration controller drives",
                        usage="devstate vm --spec SPEC --incoming URI [options]\n"
                              "       devstate vm --spec SPEC --qmp unix:PATH "
                              "[--incoming URI|defer] [options]",
                        description="A destination needs --incoming; a VM driven over QMP "
                                    "needs --qmp (without --incoming it is a source).")
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
    _vcpu_arguments(vm)
    vm.add_argument("--spec-order", action="store_true",
                    help="baseline: devices in spec order, dealt round-robin")
    _tls_arguments(vm, server=True)
    vm.add_argument("--hello-timeout", type=_seconds, default=HELLO_TIMEOUT_S, metavar="SECONDS",
                    help="how long a connection may take to send its hello before it is "
                         f"dropped as a stranger (default {HELLO_TIMEOUT_S:g})")
    vm.add_argument("--once", action="store_true",
                    help="exit after one incoming migration instead of running the VM")
    vm.add_argument("--parent", type=int, default=None, metavar="PID",
                    help=argparse.SUPPRESS)  # started by a local migration: end with it
    vm.add_argument("--fault", default=None, type=_fault,
                    help=argparse.SUPPRESS)  # tests: arm a fault (devstate.worker.faults)


def _costs_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``devstate costs``' actions and flags."""
    costs = sub.add_parser("costs", help="show or forget the cost model learned on this host "
                                         "(docs/costs.md)")
    actions = costs.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="the file, and the constants it holds")
    _cost_model_arguments(show, learning=False)
    show.add_argument("--json", action="store_true", help="print the constants as JSON")
    reset = actions.add_parser("reset", help="remove the file: the next run starts from "
                                             "the defaults")
    _cost_model_arguments(reset, learning=False)


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


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
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


# "/s" is optional on the command line: --max-bandwidth is a rate whatever it says.
_PER_SECOND = re.compile(r"\s*/\s*s\s*$", re.IGNORECASE)


def _rate(text: str) -> float:
    """``--max-bandwidth``: bytes/s, with or without a unit (B, KB, KiB, MB, MiB, GB,
    GiB) and ``/s``."""
    try:
        rate = parse_quantity(_PER_SECOND.sub("", text), "--max-bandwidth")
    except SpecError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None
    if rate <= 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return float(rate)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be above 0")
    return value


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


def _vcpu_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags for how the KVM VM's owner gets and puts its vCPUs (migrate and vm)."""
    parser.add_argument("--vcpu-threads", type=_positive, default=None, metavar="N",
                        help="kvm: threads the VM's owner gets/puts vCPUs with, one per CPU "
                             "(default: every usable CPU with the native engine, 1 with ctypes)")
    parser.add_argument("--vcpu-readback", choices=[r.value for r in Readback], default=None,
                        help="kvm destination: before-commit reads every vCPU back in its "
                             "put (a difference fails the migration; costs downtime); digest "
                             "leaves it to the digests compared after the resume "
                             f"(default {MigrationParams().vcpu_readback})")
    parser.add_argument("--experimental-sharded-vms", action="store_true",
                        help="kvm experiment, not a real guest shape: a KVM VM per worker, "
                             "each with its share of the vCPUs")


def vcpu_params(args: argparse.Namespace) -> dict[str, Any]:
    """The MigrationParams fields :func:`_vcpu_arguments`' flags give."""
    default = MigrationParams()
    return {"vcpu_threads": args.vcpu_threads,
            "vcpu_readback": Readback(args.vcpu_readback or default.vcpu_readback),
            "sharded_vms": args.experimental_sharded_vms}


def vm_flags(args: argparse.Namespace) -> list[str]:
    """The parameter flags given to ``devstate vm`` (which --params replaces)."""
    given = {"--workers": args.workers, "--chunk-size": args.chunk_size, "--cpus": args.cpus,
             "--vcpu-threads": args.vcpu_threads, "--vcpu-readback": args.vcpu_readback,
             "--experimental-sharded-vms": args.experimental_sharded_vms or None,
             "--spec-order": args.spec_order or None,
             "--fault": args.fault}
    return [flag for flag, value in given.items() if value is not None]
