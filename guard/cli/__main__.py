"""``python -m guard.cli ARGS`` is ``guard ARGS``."""

import sys

from . import main

sys.exit(main())
