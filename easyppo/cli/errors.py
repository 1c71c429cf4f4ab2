"""How every command reports a mistake: one ``error: <key or file:row:field>: <what is wrong>`` line
and exit status 2 (1 when a run stops itself, such as too many non-finite steps); ``--verbose``
shows the traceback instead."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from easyppo.core.options import OptionError
from easyppo.data.errors import BadRowsError, DataConfigError, RowError
from easyppo.run.distributed import DistributedConfigError
from easyppo.run.export import ExportDirectoryError
from easyppo.run.generate_options import OptionError as FlagError
from easyppo.run.lock import RunLockedError
from easyppo.run.pacing import NonFiniteTrainingError
from easyppo.run.plots import PlotError


class UsageError(ValueError):
    """A command line that cannot work as given (missing or conflicting flags); the message says which."""


# Mistakes in what the user asked for: options, files, rows, directories in use.
USER_ERRORS = (
    UsageError,
    OptionError,
    FlagError,
    DataConfigError,
    RowError,
    BadRowsError,
    RunLockedError,
    ExportDirectoryError,
    DistributedConfigError,
    PlotError,
    FileNotFoundError,
    FileExistsError,
)
RUN_ERRORS = (NonFiniteTrainingError,)  # a run that stopped itself, with the reason


class Outcome:
    """The exit status a ``reporting`` block settled on (0 unless an error was reported)."""

    status = 0


def one_line(error: BaseException) -> str:
    """The error as one line; for bad rows, the first row's location and reason with the count."""
    if isinstance(error, BadRowsError) and error.errors:
        more = "; --verbose lists them" if len(error.errors) > 1 else ""
        return f"{error.errors[0]}; {error.headline}{more}"
    return " ".join(str(error).split())


@contextlib.contextmanager
def reporting(verbose: bool) -> Iterator[Outcome]:
    """Turns user and run errors raised in the block into one ``error:`` line on stderr."""
    outcome = Outcome()
    try:
        yield outcome
    except USER_ERRORS + RUN_ERRORS as error:
        if verbose:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        outcome.status = 1 if isinstance(error, RUN_ERRORS) else 2


def pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose``, and whether it was there."""
    return [arg for arg in argv if arg != "--verbose"], "--verbose" in argv
