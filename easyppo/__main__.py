"""``python -m easyppo COMMAND ...``: the same as the installed ``easyppo`` command."""

import sys

from easyppo.cli.main import main

sys.exit(main())
