"""A byte stream of concatenated JSON texts, split into values: QMP's input framing.

Runs in: a QMP session's protocol callbacks (:mod:`devstate.qmp.server`).

Input is JSON texts, concatenated, with or without whitespace between them (the
qemu.qmp client sends no newline). :class:`JsonStream` runs ``raw_decode`` at the first
non-whitespace character of the unparsed input:

- If the decoder fails, the input is *unfinished* (wait for more bytes) when appending could
  still make it valid: the failure is at the end of the input, inside a string that has not
  closed, or on a token that runs to the end and may still grow (``-1.5e``, ``tru``, a
  ``\\u`` escape short of four digits). Otherwise it is *malformed*.
- A top-level number followed only by number characters may still grow too: wait.
- Malformed input gets one ``GenericError`` reply without an id ("JSON parse error, ...").
  **Resynchronisation rule**: discard input up to the next ``{`` at or after the position
  where decoding failed (at least one character past the start of the bad text); if there is
  none yet, discard everything and keep discarding until a ``{`` arrives. A request is an
  object, so an object's start is the place to resume: a good request after garbage is
  parsed, unless the garbage left a string or container open that swallows it. A ``{``
  inside the garbage after the failure point can cost extra error replies (an object
  without ``execute``, then a stray ``}``), never a good request.
- Bytes that are not UTF-8 are decoded with ``surrogateescape``, which turns each into a
  lone surrogate U+DC80..U+DCFF that valid UTF-8 can never produce: a value containing one
  is reported as malformed; outside strings they fail to decode anyway.
- More than MAX_PENDING_CHARS of input without a complete value is reported and discarded
  (then resynchronised as above), so a client cannot grow the buffer without bound.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass
from typing import Any

# Unparsed input a client may leave pending: QMP requests are small, a megabyte of an
# unfinished value is a broken or hostile client. Each read re-decodes the pending text, so
# this also bounds the work one read can cost.
MAX_PENDING_CHARS = 1 << 20
# Containers nested deeper than this are a parse error. QEMU allows 1024, but Python's
# recursive decoder and encoder stop near the recursion limit (1000) and no request needs
# more than a few levels.
MAX_NESTING = 256
_NON_WHITESPACE = re.compile(r"[^ \t\n\r]")
# What the decoder may stop on at the end of the input that could still grow into a valid
# token: a number, a prefix of true/false/null, a \u escape short of four digits. The empty
# match covers a failure right at the end of the input.
_PARTIAL_TOKEN = re.compile(
    r"[-+.eE0-9]*|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?|u[0-9a-fA-F]{0,4}")
_NUMBER_CHARS = re.compile(r"[-+.eE0-9]*")
_ESCAPED_BYTES = re.compile(r"[\udc80-\udcff]")


@dataclass(frozen=True, slots=True)
class BadInput:
    """Input that is not JSON (or too much of it): answered with an id-less GenericError."""

    desc: str


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# NaN and infinities would come back out as invalid JSON when an id is echoed.
_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_reject_constant)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_too_deep(value: Any) -> bool:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_NESTING:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


class JsonStream:
    """Splits a byte stream of concatenated JSON texts into values and :class:`BadInput`.

    Runs in: a session's protocol callbacks; it owns the unparsed input. The framing and
    resynchronisation rules are in the module docstring.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._text = ""
        self._is_skipping = False  # after malformed input: discard up to the next "{"

    def feed(self, data: bytes) -> list[Any]:
        """Take more bytes; return the values and parse errors they complete, in order."""
        text = self._text + self._utf8.decode(data)
        items, pos = self._split(text)
        self._text = text[pos:]
        if len(self._text) > MAX_PENDING_CHARS:
            items.append(BadInput(f"JSON parse error, more than {MAX_PENDING_CHARS} "
                                   "characters without a complete value"))
            self._text = ""
            self._is_skipping = True
        return items

    def _split(self, text: str) -> tuple[list[Any], int]:
        items: list[Any] = []
        pos = 0
        while True:
            if self._is_skipping:
                pos = text.find("{", pos)
                if pos < 0:
                    return items, len(text)
                self._is_skipping = False
            start = _NON_WHITESPACE.search(text, pos)
            if start is None:
                return items, len(text)
            pos = start.start()
            try:
                value, end = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                # (CPython's decoder reports a string cut short as "Unterminated string".)
                if exc.msg.startswith("Unterminated string") or _PARTIAL_TOKEN.fullmatch(
                        text, exc.pos):
                    return items, pos
                reason = exc.msg.removesuffix(" at")
                items.append(BadInput(f"JSON parse error, {reason[:1].lower()}{reason[1:]}"))
                pos, self._is_skipping = max(exc.pos, pos + 1), True
                continue
            except (ValueError, RecursionError) as exc:
                # NaN, an infinite float, an int too long to convert, or nesting deep enough
                # to hit the recursion limit: all malformed, with no better position known.
                reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
                items.append(BadInput(f"JSON parse error, {reason}"))
                pos, self._is_skipping = pos + 1, True
                continue
            if _is_number(value) and _NUMBER_CHARS.fullmatch(text, end):
                return items, pos  # "12" may be the start of "123"
            if _ESCAPED_BYTES.search(text, pos, end):
                value = BadInput("JSON parse error, invalid UTF-8")
            elif _is_too_deep(value):
                value = BadInput(f"JSON parse error, nesting deeper than {MAX_NESTING}")
            items.append(value)
            pos = end
