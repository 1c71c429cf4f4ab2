"""The work of each program a run executes: model FLOPs (all devices) and bytes streamed per device.

Counted with ``easyppo.plan.flops`` from the run's architectures, batch and options, for the same
worst case the programs are compiled with (every row at full length). Per device, compute divides
evenly over the mesh (SPMD); weights are read whole by every device of a tensor-parallel group
(FSDP gathers each layer before using it), so a pass streams ``weight bytes / mesh.tensor`` per
device; the optimizer reads and writes each trained parameter's float32 state once per update; the
KV cache is split over every axis.
"""

from __future__ import annotations

import dataclasses

from easyppo.models import llama
from easyppo.plan import flops

# The float32 optimizer update per trained parameter: read the weight, gradient and Adam's two
# moments (16 bytes), write the weight and the moments back (12 bytes).
OPTIMIZER_BYTES_PER_PARAM = 28


@dataclasses.dataclass(frozen=True)
class Work:
    """A program's model FLOPs (summed over devices) and the HBM bytes each device streams."""

    flops: float = 0.0
    bytes_per_device: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes_per_device + other.bytes_per_device)

    def times(self, n: float) -> Work:
        return Work(self.flops * n, self.bytes_per_device * n)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int
    fsdp: int
    tensor: int

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor


def forward_pass(
    config: llama.LlamaConfig,
    mesh: MeshShape,
    *,
    rows: int,
    seq_len: int,
    head_positions: int,
    head: flops.Head,
    microbatches: int = 1,
) -> Work:
    """A frozen model's forward pass (a reference, a reward model, a scoring pass) in ``microbatches``."""
    return Work(
        flops.forward(config, rows=rows, seq_len=seq_len, head_positions=head_positions, head=head),
        microbatches * flops.weight_bytes(config, head) / mesh.tensor,
    )


def training_pass(
    config: llama.LlamaConfig,
    mesh: MeshShape,
    *,
    rows: int,
    seq_len: int,
    head_positions: int,
    head: flops.Head,
    microbatches: int,
    optimizer_steps: int = 1,
) -> Work:
    """Forward and backward over ``rows`` in ``microbatches``, then ``optimizer_steps`` updates.

    Each microbatch reads the weights in the forward and the backward pass (and once more when remat
    ``full`` recomputes the forward); each optimizer step streams the state of the model's share.
    """
    passes = 3 if config.remat == "full" else 2
    weight_reads = microbatches * passes * flops.weight_bytes(config, head) / mesh.tensor
    params = config.num_params() if head == "lm" else _score_model_params(config)
    optimizer = optimizer_steps * OPTIMIZER_BYTES_PER_PARAM * params / (mesh.fsdp * mesh.tensor)
    count = flops.forward_backward(
        config, rows=rows, seq_len=seq_len, head_positions=head_positions, head=head, remat=config.remat
    )
    return Work(count, weight_reads + optimizer)


def _score_model_params(config: llama.LlamaConfig) -> int:
    """A reward or value model's parameters: the causal LM's, with a 1-output head instead of the LM head."""
    lm_head = 0 if config.tie_word_embeddings else config.hidden_size * config.vocab_size
    return config.num_params() - lm_head + config.hidden_size


def generation(config: llama.LlamaConfig, mesh: MeshShape, *, rows: int, prompt_len: int, new_tokens: int) -> Work:
    """Prefill and decode: every decoded token reads the weights and the KV cache."""
    streamed = flops.decode_bytes(config, rows=rows, prompt_len=prompt_len, new_tokens=new_tokens)
    prefill_weights = flops.weight_bytes(config, "lm")
    return Work(
        flops.generation(config, rows=rows, prompt_len=prompt_len, new_tokens=new_tokens),
        (prefill_weights + streamed["weights"]) / mesh.tensor + streamed["kv_cache"] / mesh.devices,
    )


def mesh_shape(mesh) -> MeshShape:
    """The (data, fsdp, tensor) sizes of a ``jax.sharding.Mesh`` over easyppo's axes."""
    shape = dict(mesh.shape)
    return MeshShape(shape.get("data", 1), shape.get("fsdp", 1), shape.get("tensor", 1))
