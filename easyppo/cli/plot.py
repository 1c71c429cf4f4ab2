"""``easyppo plot RUN_DIR``: PNG training curves (loss, score, KL, accuracy, tokens/s) of a run.

    easyppo plot runs/demo/ppo                 # -> runs/demo/ppo/plots/*.png
    easyppo plot runs/demo/ppo --output=figs

Reads the run's ``logs/metrics.jsonl`` (a metrics file may be named directly); needs matplotlib
(``pip install 'easyppo[plot]'``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from easyppo.cli import errors
from easyppo.run import plots


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easyppo plot", description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("run", help="a run's output directory (or its logs/metrics.jsonl)")
    parser.add_argument("--output", default="", help="where to write the PNG files (default: RUN_DIR/plots)")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    with errors.reporting(args.verbose) as outcome:
        written = plots.write_plots(args.run, args.output or None)
        print("wrote " + ", ".join(written))
    return outcome.status
