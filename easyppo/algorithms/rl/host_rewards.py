"""Host-side reward sources over a rollout: decode the responses, look up each row's ground truth,
call the reward functions, and hand the scores back to the device as rows.

Decoding waits only for the rollout; the trainer dispatches the scoring forward passes first, so the
device computes log-probs while the host computes rewards.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from easyppo.algorithms.rl.rollout import Rollout
from easyppo.rewards.sources import RewardSources


class HostRows:
    """A rollout's rows on the host (every process holds all of them), with what rewards need."""

    def __init__(self, rollout: Rollout, example_index: jax.Array, samples_per_prompt: int):
        arrays = {
            "prompt_ids": rollout.prompt_ids,
            "prompt_mask": rollout.prompt_mask,
            "response_ids": rollout.response_ids,
            "response_mask": rollout.response_mask,
            "row_mask": rollout.row_mask,
            "finished": rollout.finished,
            "example_index": example_index,
        }
        host = jax.tree.map(np.asarray, multihost_utils.process_allgather(arrays, tiled=True))
        self.arrays = host
        self.example_index = np.repeat(host["example_index"], samples_per_prompt)
        self.real = host["row_mask"] > 0

    def texts(self, tokenizer: Any) -> tuple[list[str], list[str]]:
        """(responses, prompts) decoded without special tokens; '' for padding rows."""
        a = self.arrays
        responses, prompts = [], []
        for row in range(len(self.real)):
            if not self.real[row]:
                responses.append("")
                prompts.append("")
                continue
            response = a["response_ids"][row][a["response_mask"][row] > 0]
            prompt = a["prompt_ids"][row][a["prompt_mask"][row] > 0]
            responses.append(tokenizer.decode(response.tolist(), skip_special_tokens=True))
            prompts.append(tokenizer.decode(prompt.tolist(), skip_special_tokens=True))
        return responses, prompts


def host_scores(
    sources: RewardSources, rows: HostRows, *, tokenizer: Any, answers_of
) -> tuple[np.ndarray, dict[str, float]]:
    """The weighted host reward [R] (0 on padding rows) and each source's mean over the real rows.

    ``answers_of(example_index) -> list of answers`` is the batcher of the data the prompts came from.
    """
    num_rows = len(rows.real)
    if not sources.host:
        return np.zeros(num_rows, np.float32), {}
    responses, prompts = rows.texts(tokenizer)
    real = np.flatnonzero(rows.real)
    answers = answers_of(rows.example_index[real]) if len(real) else []
    total_real, per_source = sources.score([responses[i] for i in real], answers, [prompts[i] for i in real])
    total = np.zeros(num_rows, np.float32)
    total[real] = total_real
    means = {f"reward/{name}": float(np.mean(values)) if len(values) else 0.0 for name, values in per_source.items()}
    # "accuracy": the first source that checks the response (not merely its format).
    accuracy = next((name for name in sources.names if name != "format"), None)
    if accuracy is not None:
        means["accuracy"] = means[f"reward/{accuracy}"]
    return total, means


def held_out_pairs(
    rows: HostRows, score: np.ndarray, source_means: dict[str, float], **extra: np.ndarray
) -> dict[str, tuple[np.float32, np.float32]]:
    """Held-out metrics of a rollout as (sum, count) pairs over its real rows: the score (and its
    square, for the std), response length, stop rate, each reward source's mean, and any ``extra``
    per-row values (e.g. ``kl_per_sequence``)."""
    real = rows.real.astype(np.float32)
    count = np.float32(real.sum())
    total = lambda x: (np.float32(np.sum(x * real)), count)
    pairs = {
        "score": total(score),
        "score_sq": total(score**2),
        "response_length": total(rows.arrays["response_mask"].sum(-1)),
        "eos_rate": total(rows.arrays["finished"].astype(np.float32)),
        **{name: total(values) for name, values in extra.items()},
    }
    pairs.update({name: (np.float32(value * count), count) for name, value in source_means.items()})
    return pairs
