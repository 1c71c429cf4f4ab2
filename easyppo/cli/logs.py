"""What a command prints while it works: easyppo's own progress, not its libraries' chatter.

By default the root logger shows warnings and errors only, easyppo's loggers show INFO (data
statistics, step lines, checkpoints), and Python warnings from libraries (deprecations, JAX's
``os.fork()`` notice) are hidden. ``--verbose`` shows everything at INFO, warnings included.
"""

from __future__ import annotations

import logging
import sys
import warnings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("absl", "orbax", "jax", "datasets", "fsspec", "urllib3", "filelock")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the stream current when
    the handler was made (which a caller, or a test harness, may have replaced and closed since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        del value


def configure(verbose: bool, *, progress: bool = True) -> None:
    """Sets up logging for one command; ``force`` replaces any handler a library installed at import.

    ``progress=False`` hides easyppo's own INFO lines too (unless ``verbose``): for commands whose
    output is the answer, such as ``generate --prompt``.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format=LOG_FORMAT,
        handlers=[_StderrHandler()],
        force=True,
    )
    logging.getLogger("easyppo").setLevel(logging.INFO if verbose or progress else logging.WARNING)
    for name in QUIET_LOGGERS:  # NOTSET: follow the root logger again
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    try:  # absl keeps its own verbosity, which orbax's INFO lines go through
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass
    if not verbose:
        warnings.filterwarnings("ignore")
