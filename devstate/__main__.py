"""``python -m devstate``: the same as the ``devstate`` command."""

import sys

from devstate.cli import main

sys.exit(main())
