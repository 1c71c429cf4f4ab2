"""``easyppo generate``: completions for prompts, optionally scored by a reward model.

    easyppo generate --checkpoint=runs/demo/ppo/hf --prompt "Describe the fox."
    echo "Describe the fox." | easyppo generate --checkpoint=runs/demo/ppo/hf --prompts=-
    easyppo generate --checkpoint=runs/demo/ppo/hf --prompts=prompts.jsonl --output=out.jsonl

One flag per field of ``easyppo.run.generate.GenerateOptions``; the work is ``generate_file``.
Prompts given on the command line (``--prompt``, repeatable) or on standard input (``--prompts=-``:
one prompt row as JSON, or one plain-text user message, per line) are written to a temporary prompts
file, so they go through the same chat format, truncation and batching as a file; without
``--output`` their completions are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import TextIO

from easyppo.cli import errors, logs
from easyppo.data.chat import FORMAT_NAMES
from easyppo.data.examples import TRUNCATION_MODES
from easyppo.run import distributed
from easyppo.run.generate import generate_file
from easyppo.run.generate_options import DEFAULT_MAX_NEW_TOKENS, DTYPES, GenerateOptions


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
    add("--prompts", default="", help="prompt rows (.jsonl / .json / .parquet, comma-separated); -: standard input")
    add("--prompt", action="append", default=[], help="one user message to complete (repeatable)")
    add("--output", default="", help="JSONL file to write (replaced only when the run completes); none: print")
    add("--tokenizer", default="", help="tokenizer file or directory (default: the checkpoint's)")
    add("--chat_format", default="", help=f"{'|'.join(FORMAT_NAMES)} (default: the run's, else tulu)")
    add("--pad_id", type=_token, default=None, help="pad token, an id or a string (default: the tokenizer's)")
    add("--reward_model", default="", help="a reward model to score every completion with")
    add(
        "--max_new_tokens",
        type=int,
        default=defaults.max_new_tokens,
        help=f"tokens per completion (default {DEFAULT_MAX_NEW_TOKENS}, fewer if the model has fewer positions left)",
    )
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


def prompt_rows(prompts: Sequence[str], stdin: TextIO | None) -> list[dict]:
    """Prompt rows from ``--prompt`` texts and, when given, standard input (a JSON row or a text per line)."""
    rows = [{"prompt": text} for text in prompts]
    for number, line in enumerate(stdin or (), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise errors.UsageError(f"<stdin>:{number}: not a JSON prompt row ({e.msg})") from None
        else:
            rows.append({"prompt": line})
    return rows


def _inline_inputs(args: argparse.Namespace, workdir: str) -> bool:
    """Writes ``--prompt`` / standard-input prompts to a prompts file in ``workdir``; True if there were any."""
    from_stdin = args.prompts == "-"
    if not args.prompt and not from_stdin:
        return False
    if args.prompts and not from_stdin:
        raise errors.UsageError("--prompt: give prompts either with --prompt or in a --prompts file, not both")
    rows = prompt_rows(args.prompt, sys.stdin if from_stdin else None)
    if not rows:
        raise errors.UsageError("--prompts: standard input held no prompts")
    args.prompts = os.path.join(workdir, "prompts.jsonl")
    with open(args.prompts, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return True


def print_completions(path: str, out: TextIO) -> None:
    """Each completion of a generated JSONL file, under a header naming its prompt and sample."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            header = f"[prompt {row['index']}, sample {row['sample']}"
            header += f", score {row['score']:.4g}]" if "score" in row else "]"
            print(f"{header}\n{row['response']}\n", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: returns 0 on success, 2 (after printing ``error: ...``) on bad options or prompt rows."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    verbose = args.__dict__.pop("verbose")
    logs.configure(verbose, progress=bool(args.output) and not args.prompt and args.prompts != "-")
    with errors.reporting(verbose) as outcome, tempfile.TemporaryDirectory(prefix="easyppo-generate-") as workdir:
        inline = _inline_inputs(args, workdir)
        if not args.prompts:
            raise errors.UsageError("--prompts: give a prompts file, --prompts=- (standard input) or --prompt TEXT")
        printed = not args.output
        if printed and not inline:
            raise errors.UsageError("--output: name the JSONL file to write (or pass --prompt to print completions)")
        if printed:
            args.output = os.path.join(workdir, "completions.jsonl")
        del args.prompt
        distributed.initialize()  # EASYPPO_DISTRIBUTED (auto | always | never); before any other JAX call
        summary = generate_file(GenerateOptions(**vars(args)))
        if printed:
            print_completions(summary.output, sys.stdout)
    if outcome.status:
        return outcome.status
    if printed:
        return 0
    line = (
        f"wrote {summary.rows} completions of {summary.prompts} prompts to {summary.output}: "
        f"{summary.finished_fraction:.1%} finished, {summary.mean_response_tokens:.1f} tokens on average"
    )
    if summary.mean_score is not None:
        line += f", mean score {summary.mean_score:.4g}"
    print(line)
    return 0
