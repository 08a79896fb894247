"""``devstate vm``: host a machine's devices, as a migration's destination or as a VM a
migration controller drives over QMP."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from devstate.cli.fds import ensure_open_files
from devstate.cli.machines import default_workers
from devstate.cli.parser import tls_config, vcpu_params
from devstate.config.params import MigrationParams
from devstate.config.spec import MachineConfig, load_spec
from devstate.errors import SpecError
from devstate.lifecycle import end_with_parent
from devstate.net.tls import TlsConfig
from devstate.net.transport import refuse_live_socket


async def vm_command(args: argparse.Namespace) -> int:
    """``devstate vm``."""
    from devstate.migration.destination import IncomingVM
    from devstate.net.channels import Listener, parse_uri

    if args.parent is not None:
        # A destination started by a local migration: SIGTERM (clean unwind) if it dies.
        end_with_parent(args.parent, signal.SIGTERM)
        # It runs as a background group of its parent's terminal session: what it says
        # on stderr gets through even where the terminal stops such writers (stty tostop).
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    spec = load_spec(args.spec)
    tls = tls_config(args)
    params = _vm_params(args)
    ensure_open_files(spec, params.workers)
    if args.qmp is not None:
        return await _vm_qmp(args, spec, params, tls)
    listener = Listener(parse_uri(args.incoming), hello_timeout_s=args.hello_timeout)
    async with IncomingVM(spec, params) as vm:
        listener.open()
        try:
            print(f"ready {listener.address}", flush=True)
            result = await vm.accept_migration(listener, tls)
            if not result.completed:
                # A local migration's destination leaves a source's ABORT to the source,
                # its parent, which says why (once) to the person who started both.
                if args.parent is None or not result.aborted:
                    print(f"devstate: incoming migration failed: {result.reason}",
                          file=sys.stderr)
                return 1
            if not args.once:
                await asyncio.Event().wait()  # the VM runs until the process is stopped
        finally:
            listener.close()
    return 0


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
                           spec_order=args.spec_order, **vcpu_params(args),
                           fault=args.fault)


async def _vm_qmp(args: argparse.Namespace, spec: MachineConfig, params: MigrationParams,
                  tls: TlsConfig | None) -> int:
    """``devstate vm --qmp``: the VM runs until a controller says ``quit`` (or SIGTERM);
    exits 1 if a failed incoming migration ended it (QEMU's exit-on-error), else 0."""
    from devstate.qmp.controller import Controller
    from devstate.qmp.schema import EVENTS
    from devstate.qmp.server import QmpServer

    path = args.qmp.removeprefix("unix:")
    server: QmpServer | None = None

    def emit(event: str, data: dict[str, Any]) -> None:
        if server is not None:
            server.emit(event, data)

    async with Controller(spec, params, incoming=args.incoming, emit=emit, tls=tls,
                          hello_timeout_s=args.hello_timeout) as controller:
        server = QmpServer(controller.commands(), events=EVENTS)
        async with server:
            refuse_live_socket(path)  # another VM's QMP socket: never take it over
            await server.start(path)
            print(f"qmp unix:{path}", flush=True)
            if controller.ready is not None:
                print(f"ready {controller.ready}", flush=True)
            await controller.quitting.wait()
    return controller.exit_code
