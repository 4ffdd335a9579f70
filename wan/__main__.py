"""``python -m wan``: see wan/cli.py."""

import sys

from .cli import main

sys.exit(main())
