"""QEMU's migration parameters and capabilities as a devstate VM keeps them, and what they
make of its :class:`~devstate.config.params.MigrationParams`.

Runs in: the ``devstate vm --qmp`` process. Pure functions and frozen values: a command's
arguments in, the new :class:`Parameters` / capability map (or a :class:`QmpError` saying
why not) out; the controller derives the MigrationParams of its next migration from them
with :func:`migration_params`. docs/qmp.md has the table of what each one means here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devstate.config.params import (
    MAX_PEER_TIMEOUT_S,
    MIN_PEER_TIMEOUT_S,
    MigrationParams,
    Overrun,
    Routing,
)
from devstate.qmp.commands import Param, QmpError

# QEMU's bounds (migration/options.c): downtime-limit up to 2000 s, channels 1-255.
MAX_DOWNTIME_LIMIT_MS = 2_000_000
MAX_CHANNELS = 255
# max-bandwidth is a QAPI 'size' (uint64); QEMU's input visitor also takes negative
# integers "for backward compatibility" and stores them modulo 2**64 (a huge rate).
UINT64_MODULUS = 1 << 64
INT64_MIN = -(1 << 63)


@dataclass(frozen=True, slots=True)
class Parameters:
    """``query-migrate-parameters``' values, QEMU's defaults (migration/options.c) for
    QEMU's names; devstate's own are ``x-``. Field ``a_b`` is QMP's ``a-b``."""

    downtime_limit: int = 300          # ms
    max_bandwidth: int = 128 << 20     # bytes/s, QEMU's MAX_THROTTLE; never limits the stop
    multifd_channels: int = 2          # used with the multifd capability only, as in QEMU
    tls_creds: str = ""                # id of a tls-creds-x509 object; '' is no TLS
    tls_hostname: str = ""             # '' checks the URI's host
    tls_authz: str = ""                # always '': devstate has no authz objects
    x_routing: Routing = Routing.AFFINITY
    x_overrun: Overrun = Overrun.FINISH
    x_peer_timeout: int = 0            # ms without a word from the peer; 0: derived


@dataclass(frozen=True, slots=True)
class Setting:
    """One parameter of ``migrate-set-parameters``: its JSON type, how a value is checked
    (and stored), and whether it may change while a migration runs (QEMU takes every
    change at once; devstate only those it can apply to the migration in flight)."""

    name: str
    kind: type
    check: Callable[[str, Any], Any]
    live: bool = False

    @property
    def field(self) -> str:
        """The :class:`Parameters` field it sets."""
        return self.name.replace("-", "_")


def _between(low: int, high: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if not low <= value <= high:
            raise QmpError("GenericError", f"Parameter '{name}' expects a value between "
                                           f"{low} and {high}")
        return int(value)
    return check


def _peer_timeout(name: str, value: Any) -> int:
    """0 (the derived bound, devstate.migration.liveness), or a bound in ms."""
    if value == 0:
        return 0
    return _between(int(MIN_PEER_TIMEOUT_S * 1e3), int(MAX_PEER_TIMEOUT_S * 1e3))(name, value)


def _bandwidth(name: str, value: Any) -> int:
    return _between(INT64_MIN, UINT64_MODULUS - 1)(name, value) % UINT64_MODULUS


def _choice(kind: type[enum.Enum]) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        try:
            return kind(value)
        except ValueError:
            accepted = ", ".join(str(k.value) for k in kind)
            raise QmpError("GenericError", f"Parameter '{name}' expects one of: "
                                           f"{accepted}") from None
    return check


def _any_string(_: str, value: Any) -> str:
    return str(value)


def _no_authz(name: str, value: Any) -> str:
    if value:
        raise QmpError("GenericError", f"Parameter '{name}': devstate has no authz "
                                       "objects; authorise clients with tls-creds' "
                                       "verify-peer and the CA instead")
    return ""


SETTINGS = (
    Setting("downtime-limit", int, _between(0, MAX_DOWNTIME_LIMIT_MS), live=True),
    Setting("max-bandwidth", int, _bandwidth, live=True),
    Setting("multifd-channels", int, _between(1, MAX_CHANNELS)),
    Setting("tls-creds", str, _any_string),
    Setting("tls-hostname", str, _any_string),
    Setting("tls-authz", str, _no_authz),
    Setting("x-routing", str, _choice(Routing)),
    Setting("x-overrun", str, _choice(Overrun)),
    Setting("x-peer-timeout", int, _peer_timeout),
)
# Read-only: the worker pool is started with the VM (devstate vm --workers).
WORKERS = "x-workers"


def parameter_arguments() -> tuple[Param, ...]:
    """``migrate-set-parameters``' arguments, every one optional."""
    return (*(Param(s.name, s.kind, False) for s in SETTINGS), Param(WORKERS, int, False))


def set_parameters(current: Parameters, args: dict[str, Any], *, workers: int,
                   migrating: bool) -> Parameters:
    """``migrate-set-parameters``' arguments applied to ``current``. While ``migrating``
    only the live ones may change (a value equal to the current one is no change)."""
    if WORKERS in args and args[WORKERS] != workers:
        raise QmpError("GenericError", f"Parameter '{WORKERS}' is fixed at {workers} once "
                                       "the VM has started (devstate vm --workers)")
    changes: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name not in args:
            continue
        value = setting.check(setting.name, args[setting.name])
        if migrating and not setting.live and value != getattr(current, setting.field):
            live = ", ".join(s.name for s in SETTINGS if s.live)
            raise QmpError("GenericError", f"Parameter '{setting.name}' cannot change while "
                                           f"a migration is in progress (only {live} can)")
        changes[setting.field] = value
    return dataclasses.replace(current, **changes)


def query_parameters(parameters: Parameters, *, workers: int) -> dict[str, Any]:
    """``query-migrate-parameters``' answer."""
    answer = {s.name: _json(getattr(parameters, s.field)) for s in SETTINGS}
    answer[WORKERS] = workers
    return answer


def _json(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


# -- capabilities ------------------------------------------------------------------------

class Capability(enum.StrEnum):
    """The capabilities ``query-migrate-capabilities`` lists: each one is honoured, in both
    states (docs/qmp.md says how); QEMU's others are refused when set to true."""

    EVENTS = "events"                    # MIGRATION events
    MULTIFD = "multifd"                  # off: one data channel; on: multifd-channels
    RETURN_PATH = "return-path"          # always on (two-phase commit); false is a no-op
    DIRTY_BITMAPS = "dirty-bitmaps"      # no block devices: nothing to migrate either way
    LATE_BLOCK_ACTIVATE = "late-block-activate"  # no block devices: a no-op
    PAUSE_BEFORE_SWITCHOVER = "pause-before-switchover"  # pre-switchover, migrate-continue
    SWITCHOVER_ACK = "switchover-ack"    # precopy of the devices that support it
    AUTO_CONVERGE = "auto-converge"      # throttle a live guest that outdirties precopy


# What a VM starts with: QEMU's defaults (all off), except return-path, which is devstate's
# true state: its commit always runs over the main channel's return direction.
DEFAULT_CAPABILITIES: dict[Capability, bool] = {c: c is Capability.RETURN_PATH
                                                for c in Capability}
# Set to false, these are ignored: the state does not change (see Capability).
ALWAYS_ON = frozenset({Capability.RETURN_PATH})
# QEMU's other capabilities (up to 9.1): false is accepted (they are off), true refused.
UNSUPPORTED = ("xbzrle", "rdma-pin-all", "zero-blocks", "compress",
               "postcopy-ram", "x-colo", "release-ram", "block", "postcopy-blocktime",
               "x-ignore-shared", "validate-uuid", "background-snapshot", "zero-copy-send",
               "postcopy-preempt", "dirty-limit", "mapped-ram")


def set_capabilities(current: dict[Capability, bool], items: list[Any]
                     ) -> dict[Capability, bool]:
    """``migrate-set-capabilities``' list applied to ``current``; refusals name the item."""
    wanted = dict(current)
    for k, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"capability", "state"} \
                or not isinstance(item["capability"], str) \
                or not isinstance(item["state"], bool):
            raise QmpError("GenericError", f"capabilities[{k}]: expected "
                                           "{\"capability\": string, \"state\": boolean}")
        name, state = item["capability"], item["state"]
        if name in UNSUPPORTED:
            if state:
                raise QmpError("GenericError", f"capability '{name}' is not supported by "
                                               "devstate")
            continue
        try:
            capability = Capability(name)
        except ValueError:
            raise QmpError("GenericError", f"Parameter 'capability' does not accept value "
                                           f"'{name}'") from None
        if capability not in ALWAYS_ON:
            wanted[capability] = state
    return wanted


def query_capabilities(capabilities: dict[Capability, bool]) -> list[dict[str, Any]]:
    """``query-migrate-capabilities``' answer: the capabilities devstate honours."""
    return [{"capability": str(c), "state": capabilities[c]} for c in Capability]


def migration_params(base: MigrationParams, parameters: Parameters,
                     capabilities: dict[Capability, bool]) -> MigrationParams:
    """The MigrationParams a migration runs with: ``base`` (the process's own settings)
    with what the controller set. The limit is waited for, as QEMU does, not failed on."""
    multifd = capabilities[Capability.MULTIFD]
    return dataclasses.replace(
        base, downtime_limit_ms=float(parameters.downtime_limit), wait_for_limit=True,
        channels=parameters.multifd_channels if multifd else 1,
        routing=parameters.x_routing, overrun=parameters.x_overrun,
        peer_timeout_s=parameters.x_peer_timeout / 1e3 if parameters.x_peer_timeout else None,
        precopy=capabilities[Capability.SWITCHOVER_ACK],
        auto_converge=capabilities[Capability.AUTO_CONVERGE],
        # QEMU's max-bandwidth paces the precopy; its stop-and-copy moves unthrottled.
        bandwidth_limit=float(parameters.max_bandwidth) or None, cap_stop_copy=False)
