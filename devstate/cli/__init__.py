"""The ``devstate`` command (``devstate = "devstate.cli:main"``): the top floor.

:mod:`.main` runs the subcommands, :mod:`.parser` reads the command line, :mod:`.vm` hosts
a machine (destination or QMP-driven VM), :mod:`.machines` knows the built-in machine and
whether KVM is usable. May import every room below it.
"""

from devstate.cli.machines import default_workers, demo_machine, kvm_usable, load_default_machine
from devstate.cli.main import main

__all__ = ["default_workers", "demo_machine", "kvm_usable", "load_default_machine", "main"]
