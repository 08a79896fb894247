"""Validation of plain data fields (from TOML, JSON or a command line) into typed values.

Every failure is a :class:`~devstate.errors.SpecError` whose message names the field and
the reason, e.g. ``devices[2].size: must be > 0``.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from typing import Any

from devstate.errors import SpecError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
# Byte counts and rates are u64 in the kernel's and the wire's structs; 2^63 - 1 keeps them
# exact as Python ints and as the wire's signed fields alike.
MAX_QUANTITY = 2**63 - 1
# A spec is at most four levels deep (machine, devices, a device, its after list): anything
# much deeper is hostile, and is refused before a recursive repr or walk can overflow.
MAX_DEPTH = 16
# Values shown in an error message: short, one line, and safe on any nesting.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 2, 40, 40


def shown(value: Any) -> str:
    """``value`` for an error message: repr'd, shortened, and always one line."""
    return _SHOWN.repr(value)


def parse_quantity(value: Any, path: str, *, per_second: bool = False) -> int:
    """Parse a byte count (``64MiB``, ``1.5GB``, ``4096``) or a rate (``2GiB/s``).

    One convention, SI's and IEC's: K, KB, M, MB, G, GB are powers of 1000; KiB, MiB, GiB
    powers of 1024 (so ``32MB`` is 32,000,000 bytes, 30.5 MiB); B or no unit is bytes.
    """
    number: int | float
    if isinstance(value, bool):
        raise SpecError(path, "must be a number or a string such as '64MiB'")
    if isinstance(value, int | float):
        number = value
    elif isinstance(value, str):
        number = _quantity_text(value, path, per_second)
    else:
        raise SpecError(path, "must be a number or a string such as '64MiB'")
    if number != number or number <= 0:  # NaN, zero, negative
        raise SpecError(path, "must be > 0")
    if number > MAX_QUANTITY:  # inf and 400-digit ints too, before int() or float() overflow
        raise SpecError(path, f"must be <= {MAX_QUANTITY}")
    if number < 1:  # 0.5 bytes/s would be 0 once whole, and a rate divides
        raise SpecError(path, "must be at least 1 (whole bytes)")
    return int(number)


def _quantity_text(value: str, path: str, per_second: bool) -> float:
    """A quantity written as text (``64MiB``, ``2GiB/s``) in bytes (bytes/s)."""
    text = value.strip()
    if per_second:
        if not text.lower().endswith("/s"):
            raise SpecError(path, f"{shown(value)} is not a rate: write it as e.g. '2GiB/s'")
        text = text[:-2]
    match = _QUANTITY.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise SpecError(path, f"{shown(value)} is not a quantity: use e.g. '64MiB' or 1048576")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def check_depth(data: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse data nested deeper than ``limit`` lists and tables (walked without recursion)."""
    level = [data]
    for _ in range(limit):
        level = [child for item in level if isinstance(item, Mapping | list)
                 for child in (item.values() if isinstance(item, Mapping) else item)]
    if any(isinstance(item, Mapping | list) for item in level):
        raise SpecError("", f"nested deeper than {limit} levels")


def mapping(data: Any, path: str, keys: set[str]) -> Mapping[str, Any]:
    """``data`` as a table whose keys are all among ``keys``."""
    if not isinstance(data, Mapping):
        raise SpecError(path, "must be a table (object)")
    for key in data:
        if key not in keys:
            name = key if isinstance(key, str) and key.isprintable() else shown(key)
            where = f"{path}.{name}" if path else name
            raise SpecError(where, f"unknown field (expected one of {', '.join(sorted(keys))})")
    return data


def string(value: Any, path: str) -> str:
    """``value`` as a non-empty string."""
    if not isinstance(value, str) or not value:
        raise SpecError(path, "must be a non-empty string")
    return value


def integer(value: Any, path: str, *, low: int, high: int) -> int:
    """``value`` as an integer from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, "must be an integer")
    if value < low:
        raise SpecError(path, f"must be >= {low}")
    if value > high:
        raise SpecError(path, f"must be <= {high}")
    return value


def number(value: Any, path: str, *, low: float, high: float) -> float:
    """``value`` as a number from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(path, "must be a number")
    if not low <= value <= high:
        raise SpecError(path, f"must be between {low:g} and {high:g}")
    return float(value)
