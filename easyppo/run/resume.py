"""What a resumed run must agree on with the checkpoint it resumes: its config and its tokenizer.

Resuming with another learning rate, dataset or model silently continues a different run than the
one checkpointed. ``check_config`` compares the run's config with the one saved beside the latest
checkpoint and refuses, listing every key that differs with both values, unless each is a key that
may change safely (logging, evaluation and checkpoint cadence, the mesh, ...) or one the user names in
``train.resume_with_changes``. ``check_tokenizer`` refuses a tokenizer whose fingerprint differs from
the one the checkpoints were trained with, and ``check_tokenizer_matches_models`` one whose
vocabulary differs from the tokenizer saved with a model the run starts from (the policy, a PPO
reward or value model): its ids would mean other tokens to that model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from easyppo.data.tokenizer import trained_with_other_vocabulary
from easyppo.run.config import ConfigError
from easyppo.weights import checkpoint_trees, run_directory

# Keys (a trailing "." means every key below it) that change how a run is observed, paced, placed
# or where it writes, never what it computes.
SAFE_TO_CHANGE = (
    "output_dir",
    "logging.",
    "eval.every_steps",
    "eval.at_start",
    "eval.max_batches",
    "eval.batch_size",
    "train.log_every_steps",
    "train.stop_at_step",
    "train.prefetch_batches",
    "train.preemption_sync_every_steps",
    "train.max_consecutive_nonfinite",
    "train.export_hf_dir",
    "train.resume_with_changes",
    "checkpoint.",
    "mesh.",  # a checkpoint restores onto any mesh
    "data.num_proc",
    "data.cache_dir",
    "model.remat",  # recomputation changes memory, not values
)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _allowed(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) or p == "*" for p in patterns)


def changed_keys(saved: Mapping[str, Any], current: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every key that differs, safe ones included."""
    old = dict(_flatten(saved))
    new = dict(_flatten(checkpoint_trees.json_compatible_config(current)))
    missing = object()
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    }


def check_config(saved: Mapping[str, Any], current: ml_collections.ConfigDict, *, step: int, directory: str) -> None:
    """Refuses a resume whose config differs from the checkpoint's in a key that is neither safe nor named."""
    named = tuple(k.strip() for k in str(current.train.resume_with_changes or "").split(",") if k.strip())
    refused = {k: v for k, v in changed_keys(saved, current).items() if not _allowed(k, SAFE_TO_CHANGE + named)}
    if refused:
        listed = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in refused.items())
        raise ConfigError(
            "train.resume_with_changes",
            f"resuming from step {step} of {directory} with a changed config: {listed}; if that is intended, "
            f"pass --config.train.resume_with_changes={','.join(refused)}",
        )


def check_tokenizer(saved_fingerprint: str | None, tokenizer: Any, *, step: int) -> None:
    """Refuses a tokenizer other than the one the checkpoints were trained with (older runs recorded none)."""
    if saved_fingerprint is not None and saved_fingerprint != tokenizer.fingerprint:
        raise ConfigError(
            "data.tokenizer_path",
            f"{tokenizer.source} is not the tokenizer the checkpoint of step {step} was trained with "
            f"(fingerprint {tokenizer.fingerprint[:12]} != {saved_fingerprint[:12]}); resume with the run's own tokenizer",
        )


def check_tokenizer_matches_models(tokenizer: Any, sources: list[tuple[str, str]]) -> None:
    """Refuses when a ``(config key, init_from)`` source holds a tokenizer of the same kind whose
    vocabulary differs from the run's. Sources without a tokenizer of their own cannot be checked."""
    for key, init_from in sources:
        saved = _tokenizer_of(init_from) if init_from else ""
        if saved and trained_with_other_vocabulary(tokenizer, saved):
            raise ConfigError(
                f"{key}.init_from",
                f"{init_from} was trained with another tokenizer than data.tokenizer_path={tokenizer.source} "
                "(their vocabulary files differ); use the model's own tokenizer",
            )


def _tokenizer_of(init_from: str) -> str:
    """Where a model's tokenizer is saved: beside it, or the one a run directory trained with."""
    if run_directory.is_run_directory(init_from):
        return run_directory.read_run_config(init_from).get("data", {}).get("tokenizer_path") or ""
    return init_from
