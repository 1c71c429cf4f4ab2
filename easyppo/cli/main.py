"""``easyppo``: the one command, with a subcommand per job.

    easyppo train --config=ppo:demo
    easyppo generate --checkpoint=runs/demo/ppo/hf --prompts=prompts.jsonl --output=out.jsonl
    easyppo convert to-hf CHECKPOINT OUT_DIR --verify
    easyppo plot runs/demo/ppo

Every subcommand takes ``--help``, uses one flag style (``--snake_case``; dotted config keys for
``train``) and reports a user error as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with main(argv), one-line description)
SUBCOMMANDS = {
    "train": (
        "easyppo.cli.train",
        "run or resume a training run (SFT, reward model, DPO family, PPO, group RL, online DPO)",
    ),
    "generate": (
        "easyppo.cli.generate",
        "sample completions for prompts (a file, stdin or --prompt), optionally scored",
    ),
    "convert": ("easyppo.cli.convert", "convert between Hugging Face and easyppo checkpoints; verify"),
    "plot": ("easyppo.cli.plot", "draw a run's training curves as PNG files"),
    "plan": ("easyppo.cli.plan", "compile a run for a target (a TPU topology) and report memory and time"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {about}" for name, (_, about) in SUBCOMMANDS.items())
    return f"usage: easyppo COMMAND [ARGS...]   (easyppo COMMAND --help for its options)\n\ncommands:\n{rows}"


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches to the subcommand's ``main``; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
