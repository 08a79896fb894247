"""Validation of plain data fields (from TOML, JSON or a command line) into typed values.

Every failure is a :class:`~devstate.errors.SpecError` whose message names the field and
the reason, e.g. ``devices[2].size: must be > 0``.
"""

from __future__ import annotations

import re
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

def parse_quantity(value: Any, path: str, *, per_second: bool = False) -> int:
    """Parse a byte count (``64MiB``, ``1.5GB``, ``4096``) or a rate (``2GiB/s``).

    One convention, SI's and IEC's: K, KB, M, MB, G, GB are powers of 1000; KiB, MiB, GiB
    powers of 1024 (so ``32MB`` is 32,000,000 bytes, 30.5 MiB); B or no unit is bytes.
    """
    if isinstance(value, bool):
        raise SpecError(path, "must be a number or a string such as '64MiB'")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if per_second:
            if not text.lower().endswith("/s"):
                raise SpecError(path, f"{value!r} is not a rate: write it as e.g. '2GiB/s'")
            text = text[:-2]
        match = _QUANTITY.match(text)
        if match is None or match.group(2).lower() not in _UNITS:
            raise SpecError(path, f"{value!r} is not a quantity: use e.g. '64MiB' or 1048576")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise SpecError(path, "must be a number or a string such as '64MiB'")
    if number != number or number <= 0:
        raise SpecError(path, "must be > 0")
    return int(number)


def mapping(data: Any, path: str, keys: set[str]) -> Mapping[str, Any]:
    """``data`` as a table whose keys are all among ``keys``."""
    if not isinstance(data, Mapping):
        raise SpecError(path, "must be a table (object)")
    for key in data:
        if key not in keys:
            where = f"{path}.{key}" if path else str(key)
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
