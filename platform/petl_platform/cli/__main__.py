"""``python -m petl_platform.cli ARGS``: the ``petl`` command."""

import sys

from . import main

sys.exit(main())
