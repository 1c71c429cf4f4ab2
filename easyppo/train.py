"""``python -m easyppo.train ...``: the same as ``easyppo train ...`` (kept for scripts and checkouts)."""

import sys

from easyppo.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
