"""``python -m sparsedistill ...``: the CLI without an installed entry point (e.g. PYTHONPATH=src on the GPU machine)."""

import sys

from .cli import main

sys.exit(main())
