"""What a devstate QMP server says about itself: the QEMU version whose interface it speaks,
and ``query-qmp-schema``'s SchemaInfo list for the commands and events it has.

Runs in: the ``devstate vm --qmp`` process; pure functions.

The version: devstate speaks a subset of QEMU 9.1's migration QMP: the newest argument it
takes is ``migrate-incoming``'s ``exit-on-error`` (9.1), and ``migrate`` takes neither
``blk`` nor ``inc`` (removed in 9.1). What it lacks of 9.1 (``migrate``'s ``channels``,
postcopy, most capabilities) is absent from its schema and capability list, which is what
a controller probes (libvirt reads ``query-qmp-schema`` and ``query-migrate-capabilities``,
not the version), and docs/qmp.md lists it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from devstate.qmp.commands import Command, Param

QEMU_VERSION = (9, 1, 0)

# The events a devstate VM sends, with their data members.
EVENTS: dict[str, tuple[Param, ...]] = {
    "MIGRATION": (Param("status", str),),
    "STOP": (),
    "RESUME": (),
    "SHUTDOWN": (Param("guest", bool), Param("reason", str)),
}

# QEMU's builtin types (json-type per SchemaInfoBuiltin) that argument types map to.
_BUILTINS = {"str": "string", "int": "int", "number": "number", "bool": "boolean",
             "any": "value"}


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        return "number"
    if kinds == (bool,):
        return "bool"
    if kinds == (int,):
        return "int"
    if kinds == (str,):
        return "str"
    return "any"  # arrays and objects: devstate checks their shape in the command


def _object(name: str, params: tuple[Param, ...]) -> dict[str, Any]:
    members: list[dict[str, Any]] = []
    for param in params:
        member: dict[str, Any] = {"name": param.name, "type": _type_name(param.kind)}
        if not param.required:
            member["default"] = None  # SchemaInfoObjectMember: present means optional
        members.append(member)
    return {"name": name, "meta-type": "object", "members": members}


def schema_info(commands: Iterable[Command],
                events: Mapping[str, tuple[Param, ...]]) -> list[dict[str, Any]]:
    """``query-qmp-schema``: a SchemaInfo per command and event, their argument object
    types (named ``<name>-arg``) and the builtin types those use."""
    info: list[dict[str, Any]] = [{"name": name, "meta-type": "builtin", "json-type": json}
                                  for name, json in _BUILTINS.items()]
    for command in commands:
        arg = f"{command.name}-arg"
        info.append({"name": command.name, "meta-type": "command", "arg-type": arg,
                     "ret-type": "any", "allow-oob": False})
        info.append(_object(arg, command.params))
    for event, params in events.items():
        arg = f"{event}-arg"
        info.append({"name": event, "meta-type": "event", "arg-type": arg})
        info.append(_object(arg, params))
    return info
