"""Supervised fine-tuning: next-token negative log-likelihood on assistant tokens.

Used to make a starting policy (and the reference model) for DPO and PPO. The loss is a token
mean over the whole batch: the summed NLL divided by the number of loss tokens, aggregated exactly
across gradient-accumulation microbatches (see easyppo.core.grad_accum).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from easyppo.algorithms import base
from easyppo.algorithms.contract import Algorithm, RunInputs
from easyppo.core import ops
from easyppo.core.options import option, require
from easyppo.models import llama, lora


@dataclasses.dataclass(frozen=True)
class SFTOptions:
    """The ``sft`` options."""

    logprob_chunk_size: int = option(256, "sequence positions per chunk of the vocabulary projection")

    def __post_init__(self):
        require(self.logprob_chunk_size >= 1, "logprob_chunk_size", f"must be >= 1, got {self.logprob_chunk_size}")


def sequence_logprobs(
    module,
    model_config: llama.LlamaConfig,
    params,
    input_ids,
    attention_mask,
    position_ids,
    window: ops.TargetWindow,
    *,
    chunk_size: int,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs [B, W] at the positions of ``window`` (``ops.target_window``), and its mask.

    The trunk runs over all T columns; the LM head only over the window's W. ``rng``: a training
    forward pass's key for adapter dropout (``easyppo.models.lora``).
    """
    hidden = module.apply(
        {"params": params},
        input_ids,
        attention_mask,
        position_ids,
        method="hidden_states",
        rngs=lora.dropout_rngs(rng),
    )
    head = llama.output_embedding(params, model_config)
    return ops.window_logprobs(hidden, head, window, chunk_size=chunk_size), window.mask


def make_loss_fn(module, model_config: llama.LlamaConfig, options: SFTOptions) -> base.LossFn:
    chunk_size = options.logprob_chunk_size

    def loss_fn(params, frozen, batch, rng):
        del frozen
        logprobs, mask = sequence_logprobs(
            module,
            model_config,
            params,
            batch["input_ids"],
            batch["attention_mask"],
            batch["position_ids"],
            ops.target_window(batch),
            chunk_size=chunk_size,
            rng=rng,
        )
        nll_sum = -ops.masked_sum(logprobs, mask)
        tokens = jnp.sum(mask).astype(jnp.float32)
        rows = jnp.sum(batch["example_mask"]).astype(jnp.float32)
        return nll_sum, {
            "loss": (nll_sum, tokens),
            "tokens_per_example": (tokens, rows),
        }

    return loss_fn


def make_trainer(
    config: ml_collections.ConfigDict,
    options: SFTOptions,
    mesh: jax.sharding.Mesh,
    total_steps: int,
    *,
    inputs: RunInputs,
    resuming: bool = False,
) -> base.GradientTrainer:
    return base.make_gradient_trainer(
        config,
        mesh,
        total_steps,
        kind="causal_lm",
        pad_token_id=inputs.tokenizer.pad_id,
        resuming=resuming,
        abstract=inputs.abstract,
        loss_fn_for=lambda module, model_config: make_loss_fn(module, model_config, options),
    )


ALGORITHM = Algorithm(
    name="sft",
    data_kind="sft",
    model_kind="causal_lm",
    options_type=SFTOptions,
    make_trainer=make_trainer,
)
