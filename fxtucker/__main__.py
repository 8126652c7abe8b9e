"""``python -m fxtucker``: the ``fxtucker`` command (and ``torchrun -m fxtucker`` for several processes)."""

import sys

from fxtucker.cli import main

if __name__ == "__main__":
    sys.exit(main())
