"""QEMU's migration parameters and capabilities, read and written as devstate's
:class:`~devstate.config.params.MigrationParams`.

Runs in: the ``devstate vm --qmp`` process. Pure functions: a command's arguments in, the
changes to make (or a :class:`QmpError` saying why not) out; the controller applies them
as a new frozen MigrationParams.
"""

from __future__ import annotations

import enum
from typing import Any

from devstate.config.params import MigrationParams, Overrun, Routing
from devstate.qmp.commands import QmpError

# QEMU's bounds (migration/options.c): downtime-limit up to 2000 s, channels 1-255.
MAX_DOWNTIME_LIMIT_MS = 2_000_000
MAX_CHANNELS = 255
# Capabilities a QEMU controller may set, and what devstate does with them.
HONOURED = ("events", "multifd", "return-path", "switchover-ack")
KNOWN = (*HONOURED, "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress",
         "postcopy-ram", "x-colo", "release-ram", "block", "pause-before-switchover",
         "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
         "background-snapshot", "zero-copy-send", "postcopy-preempt", "dirty-limit",
         "mapped-ram")
# What a VM starts with (devstate's defaults, not QEMU's: see ``query-migrate-capabilities``).
DEFAULT_CAPABILITIES = {"events": False, "multifd": True, "return-path": True,
                        "switchover-ack": False}


def parameter_changes(args: dict[str, Any], params: MigrationParams) -> dict[str, Any]:
    """``migrate-set-parameters``' arguments as MigrationParams field changes."""
    changes: dict[str, Any] = {}
    if "downtime-limit" in args:
        changes["downtime_limit_ms"] = _bounded(args, "downtime-limit", 0,
                                                MAX_DOWNTIME_LIMIT_MS)
    if "max-bandwidth" in args:
        changes["bandwidth_limit"] = _bounded(args, "max-bandwidth", 0, 2**62) or None
    if "multifd-channels" in args:
        changes["channels"] = _bounded(args, "multifd-channels", 1, MAX_CHANNELS)
    if "x-routing" in args:
        changes["routing"] = _choice(args, "x-routing", Routing)
    if "x-overrun" in args:
        changes["overrun"] = _choice(args, "x-overrun", Overrun)
    if "x-workers" in args and args["x-workers"] != params.workers:
        raise QmpError("GenericError", f"Parameter 'x-workers' is fixed at "
                                       f"{params.workers} once the VM has started "
                                       "(devstate vm --workers)")
    return changes


def query_parameters(params: MigrationParams) -> dict[str, Any]:
    """``query-migrate-parameters``' answer."""
    return {"downtime-limit": params.downtime_limit_ms
            if params.downtime_limit_ms is not None else 0,
            "max-bandwidth": int(params.bandwidth_limit or 0),
            "multifd-channels": params.data_channels,
            "x-routing": params.routing.value, "x-overrun": params.overrun.value,
            "x-workers": params.workers}


def merge_capabilities(current: dict[str, bool], items: list[Any]) -> dict[str, bool]:
    """``migrate-set-capabilities``' list applied to ``current``; refusals name the item."""
    wanted: dict[str, bool] = {}
    for k, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"capability", "state"} \
                or not isinstance(item["capability"], str) \
                or not isinstance(item["state"], bool):
            raise QmpError("GenericError", f"capabilities[{k}]: expected "
                                           "{\"capability\": string, \"state\": boolean}")
        name, state = item["capability"], item["state"]
        if name not in KNOWN:
            raise QmpError("GenericError", f"Parameter 'capability' does not accept value "
                                           f"'{name}'")
        if name not in HONOURED and state:
            raise QmpError("GenericError", f"capability '{name}' is not supported by "
                                           "devstate")
        if name == "return-path" and not state:
            raise QmpError("GenericError", "devstate always uses its return path: the "
                                           "destination acknowledges before the source "
                                           "lets go of its state (two-phase commit)")
        wanted[name] = state
    return {**current, **wanted}


def capability_changes(capabilities: dict[str, bool]) -> dict[str, Any]:
    """What the capabilities mean for MigrationParams: precopy, and one channel without
    multifd."""
    return {"precopy": capabilities["switchover-ack"],
            "channels": None if capabilities["multifd"] else 1}


def query_capabilities(capabilities: dict[str, bool]) -> list[dict[str, Any]]:
    """``query-migrate-capabilities``' answer: every capability QEMU has, and its state."""
    return [{"capability": name, "state": capabilities.get(name, False)} for name in KNOWN]


def _bounded(args: dict[str, Any], name: str, low: int, high: int) -> int:
    value = args[name]
    if not low <= value <= high:
        raise QmpError("GenericError", f"Parameter '{name}' expects a value between {low} "
                                       f"and {high}")
    return int(value)


def _choice(args: dict[str, Any], name: str, kind: type[enum.Enum]) -> Any:
    try:
        return kind(args[name])
    except ValueError:
        accepted = ", ".join(str(k.value) for k in kind)
        raise QmpError("GenericError", f"Parameter '{name}' expects one of: "
                                       f"{accepted}") from None
