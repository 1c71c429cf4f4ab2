"""``easyppo generate``: completions for a file of prompts, optionally scored by a reward model.

One flag per field of ``easyppo.run.generate.GenerateOptions``; the work is ``generate_file``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from easyppo.cli import errors
from easyppo.data.chat import FORMAT_NAMES
from easyppo.data.examples import TRUNCATION_MODES
from easyppo.run import distributed
from easyppo.run.generate import generate_file
from easyppo.run.generate_options import DTYPES, GenerateOptions


def _token(text: str) -> int | str:
    """A special token given on the command line: an id, or a token string such as ``<unk>``."""
    return int(text) if text.lstrip("-").isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The flags: one per :class:`GenerateOptions` field, with its defaults."""
    defaults = GenerateOptions(checkpoint="", prompts="", output="")
    parser = argparse.ArgumentParser(
        prog="easyppo generate",
        description="Sample completions for a file of prompts, optionally scored by a reward model.",
    )
    add = parser.add_argument
    add("--checkpoint", required=True, help="HF directory, easyppo model checkpoint or train run directory")
    add("--prompts", required=True, help="prompt rows (.jsonl / .json / .parquet, comma-separated)")
    add("--output", required=True, help="JSONL file to write (replaced only when the run completes)")
    add("--tokenizer", default="", help="tokenizer file or directory (default: the checkpoint's)")
    add("--chat_format", default="", help=f"{'|'.join(FORMAT_NAMES)} (default: the run's, else tulu)")
    add("--pad_id", type=_token, default=None, help="pad token, an id or a string (default: the tokenizer's)")
    add("--reward_model", default="", help="a reward model to score every completion with")
    add("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    add("--temperature", type=float, default=defaults.temperature)
    add("--top_p", type=float, default=defaults.top_p, help="1 disables nucleus sampling")
    add("--top_k", type=int, default=defaults.top_k, help="0 disables top-k sampling")
    add("--greedy", action="store_true", help="argmax decoding (ignores temperature, top_p, top_k)")
    add("--num_samples", type=int, default=defaults.num_samples, help="completions per prompt")
    add("--batch_size", type=int, default=defaults.batch_size, help="prompts per generation call (rounded up to fit)")
    add("--max_prompt_len", type=int, default=defaults.max_prompt_len, help="prompt budget in tokens")
    add("--truncation", default=defaults.truncation, help=f"over-long prompts: {'|'.join(TRUNCATION_MODES)}")
    add("--seed", type=int, default=defaults.seed)
    add("--dtype", default=defaults.dtype, help="|".join(DTYPES))
    add("--no_progress", dest="progress", action="store_false", help="no progress bar (none off a terminal)")
    add("--cache_dir", default=defaults.cache_dir, help="cache of tokenised prompts")
    add("--num_proc", type=int, default=defaults.num_proc, help="processes for tokenising the prompts")
    add("--verbose", action="store_true", help="show the traceback of an error instead of its one-line summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: returns 0 on success, 2 (after printing ``error: ...``) on bad options or prompt rows."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    verbose = args.__dict__.pop("verbose")
    with errors.reporting(verbose) as outcome:
        distributed.initialize()  # EASYPPO_DISTRIBUTED (auto | always | never); before any other JAX call
        summary = generate_file(GenerateOptions(**vars(args)))
    if outcome.status:
        return outcome.status
    line = (
        f"wrote {summary.rows} completions of {summary.prompts} prompts to {summary.output}: "
        f"{summary.finished_fraction:.1%} finished, {summary.mean_response_tokens:.1f} tokens on average"
    )
    if summary.mean_score is not None:
        line += f", mean score {summary.mean_score:.4g}"
    print(line)
    return 0
