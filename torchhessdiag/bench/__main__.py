"""``python -m torchhessdiag.bench``: see torchhessdiag/bench/__init__.py and ``--help``."""

import sys

from .cli import main

sys.exit(main())
