"""``python -m devstate``: the same as the ``devstate`` command."""

import sys

from devstate.cli import startup

startup.guard()  # a Ctrl-C during the imports below ends quietly, as for the command
from devstate.cli.main import main  # noqa: E402

sys.exit(main())
