"""QMP requests and replies as data: the command table's types, a request checked
against its command, and the JSON of a reply (ids echoed verbatim, errors in QEMU's
shape).

Runs in: the ``devstate vm --qmp`` process; pure functions, no sockets (those are
:mod:`devstate.qmp.server`'s).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from devstate.errors import DevstateError

log = logging.getLogger("devstate.qmp")


class QmpError(DevstateError):
    """Raised by a command handler to answer with a QMP error of that class and text.

    ``error_class`` is a QAPI error class (``GenericError``, ``CommandNotFound``...) and
    ``desc`` is what the client sees, e.g. ``ExecuteError`` in qemu.qmp.
    """

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True, slots=True)
class Param:
    """One argument of a command: its name, the JSON type(s) it takes, whether it must be given.

    ``float`` accepts integers as well (both are JSON numbers); ``int`` does not accept
    booleans.
    """

    name: str
    kind: type | tuple[type, ...]
    required: bool = True


@dataclass(frozen=True, slots=True)
class Command:
    """A QMP command: ``handler`` gets the checked arguments and returns the ``return`` value.

    A handler returning None answers ``{}``. It raises :class:`QmpError` to answer with an
    error of its choice; any other :class:`DevstateError` becomes a ``GenericError`` with its
    text; anything else is logged and answered as an internal error.
    """

    name: str
    handler: Callable[[dict[str, Any]], Awaitable[Any]]
    params: tuple[Param, ...] = ()


NO_ID = object()  # the request had no "id" (None would be an id of JSON null)


_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean",
               dict: "object", list: "array"}


def encode(message: dict[str, Any]) -> bytes:
    # ASCII with \u escapes: a lone surrogate echoed from an id stays valid JSON.
    return json.dumps(message, allow_nan=False).encode("ascii") + b"\r\n"


def error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request: the command's name, its (unchecked) arguments, and whether it
    came as ``exec-oob``."""

    name: str
    args: dict[str, Any]
    oob: bool


def parse_request(request: Any, *, allow_oob: bool) -> Request:
    """The command name and arguments of a request, or QmpError saying what is wrong.

    ``exec-oob`` is a member only once the session enabled the ``oob`` capability; before,
    it is unexpected, as in QEMU (qapi/qmp-dispatch.c).
    """
    if not isinstance(request, dict):
        raise QmpError("GenericError", "QMP input must be a JSON object")
    name = key_of_name = None
    for key, value in request.items():
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(value, str):
                raise QmpError("GenericError", f"QMP input member '{key}' must be a string")
            if name is not None:
                raise QmpError("GenericError", f"QMP input member '{key}' clashes with "
                                               f"'{key_of_name}'")
            name, key_of_name = value, key
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QmpError("GenericError", "QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QmpError("GenericError", f"QMP input member '{key}' is unexpected")
    if name is None:
        raise QmpError("GenericError", "QMP input lacks member 'execute'")
    return Request(name, request.get("arguments", {}), key_of_name == "exec-oob")


def _has_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:  # an integer is a number too: (int, float) reads "number"
        kinds = tuple(k for k in kinds if k is not int)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def check_arguments(command: Command, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments checked against ``command.params`` (QEMU's order and wording)."""
    for param in command.params:
        if param.name not in args:
            if param.required:
                raise QmpError("GenericError", f"Parameter '{param.name}' is missing")
        elif not _has_kind(args[param.name], param.kind):
            raise QmpError("GenericError", f"Invalid parameter type for '{param.name}', "
                                           f"expected: {_kind_name(param.kind)}")
    known = {param.name for param in command.params}
    for name in args:
        if name not in known:
            raise QmpError("GenericError", f"Parameter '{name}' is unexpected")
    return dict(args)


def encode_reply(payload: dict[str, Any], request_id: Any) -> bytes:
    # A handler may return what JSON cannot hold (an object, NaN): that is an internal
    # error for the client, not a reason to lose the session.
    message = dict(payload)
    if request_id is not NO_ID:
        message["id"] = request_id
    try:
        return encode(message)
    except (TypeError, ValueError, RecursionError) as exc:
        log.error("qmp: cannot encode a reply: %s", exc)
        return encode_reply(
            error("GenericError", f"internal error: {type(exc).__name__}: {exc}"), request_id)
