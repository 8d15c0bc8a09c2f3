"""Entry point for ``python -m anchor_lib``."""

import sys

from .cli import main

sys.exit(main())
