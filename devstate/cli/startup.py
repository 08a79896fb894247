"""Ctrl-C before ``devstate`` is ready to unwind: end quietly, there is nothing to stop yet.

Importing the runtime (uvloop, numpy, the device models' modules) takes a few hundred ms.
A KeyboardInterrupt raised in the middle of an import prints a traceback through importlib
(and may leave half-initialised modules for atexit hooks to trip over). Until
:func:`ready` hands SIGINT back to Python's default handler, a Ctrl-C exits at once
with status 130: no process, pool or socket has been started before that point.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from devstate.cli.exits import Exit


def _quit(signum: int, frame: FrameType | None) -> None:
    print("devstate: interrupted while starting", file=sys.stderr, flush=True)
    raise SystemExit(Exit.INTERRUPTED)


def guard() -> None:
    """Make an early Ctrl-C a quiet exit (unless SIGINT is ignored, as under nohup)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _quit)


def done() -> None:
    """The command has finished: a Ctrl-C from now on (the interpreter shutting down and
    joining what it started) has nothing left to interrupt, and is ignored, so that the
    exit status stays the command's own (not a death by SIGINT, -2, with nothing said)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ready() -> None:
    """Hand Ctrl-C back to KeyboardInterrupt, which the running command unwinds from."""
    if signal.getsignal(signal.SIGINT) is _quit:
        signal.signal(signal.SIGINT, signal.default_int_handler)
