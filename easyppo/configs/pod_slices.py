"""The TPU slices each pod preset is documented for, and the overrides it needs there.

One place for what docs/tpu.md promises: tests/test_plan.py compiles every entry for its topology
with the TPU compiler (so a sharding rule that does not partition, or a collective the compiler
rejects, fails there), and benchmarks/pod_plans.py plans every entry at full size and records
memory, fit and predicted time (benchmarks/results/pod_plans.md). Every non-demo preset must appear.

A topology is libtpu's name for the slice: ``v4:4x4x2`` is a v4-64 (32 chips; v4 and v5p slice
names count TensorCores, two per chip), ``v5e:8x8`` a v5litepod-64. Overrides are
``--config.`` keys with their values, chosen with ``easyppo plan``'s suggestions.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PodSlice:
    topology: str
    overrides: tuple[str, ...] = ()  # "KEY=VALUE" (each passed as --config.KEY=VALUE)
    # Why the preset does not fit this slice, where the planner shows it cannot (a known limit of
    # easyppo, said here and in the preset's docs); "" for a slice it fits.
    does_not_fit: str = ""

    def flags(self) -> list[str]:
        return [f"--config.{override}" for override in self.overrides]


POD_SLICES: dict[str, tuple[PodSlice, ...]] = {
    "sft:tulu2_7b": (
        PodSlice("v5p:4x4x4", ("train.grad_accum_steps=2",)),
        PodSlice("v4:4x4x4", ("model.remat=full", "train.grad_accum_steps=2")),
    ),
    "rm:tulu25_13b_uf": (PodSlice("v4:4x4x2", ("model.remat=full", "train.grad_accum_steps=8")),),
    "dpo:tulu25_13b_uf_mean": (
        PodSlice("v4:4x4x2", ("model.remat=full",)),
        PodSlice("v5e:8x8", ("mesh.tensor=4", "model.remat=full", "train.grad_accum_steps=2")),
    ),
    "dpo:tulu3_8b_dpo_norm": (PodSlice("v5p:2x4x4", ("model.remat=full",)),),
    "ppo:tulu25_13b_uf_mean": (PodSlice("v5p:4x4x4"), PodSlice("v4:4x4x8")),
    "ppo:tulu25_13b_uf_mean_13b_uf_rm": (PodSlice("v4:4x4x4"),),
    "grpo:tulu3_8b_rlvr": (PodSlice("v5p:4x4x4"),),
    "grpo:dr_grpo": (PodSlice("v5p:4x4x4"),),
    "grpo:dapo": (
        PodSlice(
            "v5p:4x4x8",
            ("grpo.rollout_batch_size=32", "model.remat=full", "train.grad_accum_steps=16"),
            does_not_fit=(
                "scoring 20,480-token responses: attention materialises each layer's T x T scores "
                "(about 15 GB per row per layer), and a chunk puts at least 16 rows on a chip"
            ),
        ),
    ),
}
