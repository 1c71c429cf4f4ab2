"""Model FLOPs of the canonical workloads (benchmarks/canonical.py), for MFU against the matmul peak.

The formulas of ``easyppo.plan.flops``, which the planner counts with too: 2 FLOPs per weight per
token forward, 6 forward + backward, attention over the full square of each sequence (forward 4 rows L H hd T^2).
The LM head counts only at the positions whose log-probs are used (the responses): that is the
useful work, whatever an implementation projects. Counted is the work each variant runs: the PPO
scoring pass of the policy only when it is run (``old_logprobs="recompute"``), the DPO reference
pass only when it is on the fly. Norms, softmax, the embedding gather, optimizer updates and any
recomputation are not counted.
"""

from __future__ import annotations

import argparse

from easyppo.models import llama
from easyppo.plan import flops as model_flops


def _pass(config: llama.LlamaConfig, *, rows: int, seq_len: int, head_positions: int, head: str, train: bool) -> float:
    """A forward (or, ``train``, forward + backward) pass: trunk over every token, head where used."""
    count = model_flops.forward_backward if train else model_flops.forward
    return count(config, rows=rows, seq_len=seq_len, head_positions=head_positions, head=head)


def dpo_step(config: llama.LlamaConfig, args: argparse.Namespace) -> float:
    rows, seq_len = 2 * args.batch_pairs, args.prompt_len + args.response_len
    flops = _pass(config, rows=rows, seq_len=seq_len, head_positions=args.response_len, head="lm", train=True)
    if args.reference == "on_the_fly":
        flops += _pass(config, rows=rows, seq_len=seq_len, head_positions=args.response_len, head="lm", train=False)
    return flops


def rm_step(config: llama.LlamaConfig, args: argparse.Namespace) -> float:
    rows, seq_len = 2 * args.batch_pairs, args.prompt_len + args.response_len
    return _pass(config, rows=rows, seq_len=seq_len, head_positions=1, head="score", train=True)


def ppo_iteration(config: llama.LlamaConfig, args: argparse.Namespace) -> dict[str, float]:
    """FLOPs of generation, scoring and the update of one PPO iteration (and their total)."""
    n, prompt, new = args.num_prompts, args.prompt_len, args.response_len
    seq_len = prompt + new
    generation = model_flops.generation(config, rows=n, prompt_len=prompt, new_tokens=new)
    policy_forward = _pass(config, rows=n, seq_len=seq_len, head_positions=new, head="lm", train=False)
    scalar_forward = _pass(config, rows=n, seq_len=seq_len, head_positions=seq_len, head="score", train=False)
    scoring = policy_forward + 2 * scalar_forward  # the reference, then the critic and the reward model
    if args.old_logprobs == "recompute":
        scoring += policy_forward
    update = _pass(config, rows=n, seq_len=seq_len, head_positions=new, head="lm", train=True)
    update += _pass(config, rows=n, seq_len=seq_len, head_positions=seq_len, head="score", train=True)
    return {"generation": generation, "scoring": scoring, "update": update, "total": generation + scoring + update}
