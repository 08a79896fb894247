"""The ``devstate`` command (``devstate = "devstate.cli:main"``): the top floor.

:mod:`.main` runs the subcommands, :mod:`.parser` reads the command line, :mod:`.vm` hosts
a machine (destination or QMP-driven VM), :mod:`.machines` knows the built-in machine and
whether KVM is usable, :mod:`.costs` shows and resets the learned cost model, :mod:`.exits`
names the exit statuses. May import every room below it.

Exports load on first use: ``main`` is looked up by the console script before anything
else, so a Ctrl-C during the runtime's imports that follow ends quietly (:mod:`.startup`).
"""

import importlib
from typing import Any

from devstate.cli import startup

_EXPORTS = {"default_workers": "devstate.cli.machines", "demo_machine": "devstate.cli.machines",
            "kvm_usable": "devstate.cli.machines",
            "load_default_machine": "devstate.cli.machines", "main": "devstate.cli.main"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'devstate.cli' has no attribute {name!r}")
    if name == "main":
        startup.guard()
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    # Importing devstate.cli.main set this package's ``main`` to the module: the function
    # is what the name means.
    globals()[name] = value
    return value
