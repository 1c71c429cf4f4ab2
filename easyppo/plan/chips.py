"""What a planner needs to know about each accelerator chip: memory, peak bf16 compute, memory bandwidth.

Figures are per chip, from Google's Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/
v4, /v5e, /v5p, /v6e; read 2026-11-30). They are the vendor's peaks: a roofline estimate built on
them is a lower bound on step time, never a measurement.
"""

from __future__ import annotations

import dataclasses

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One accelerator chip: ``device_kind`` is what ``jax.Device.device_kind`` reports for it."""

    name: str
    device_kind: str
    hbm_bytes: int
    peak_bf16_flops: float  # per second
    hbm_bytes_per_s: float
    chips_per_host: int

    def roofline_seconds(self, flops: float, bytes_accessed: float) -> float:
        """The larger of compute time at peak and memory time at full bandwidth."""
        return max(flops / self.peak_bf16_flops, bytes_accessed / self.hbm_bytes_per_s)


CHIPS: tuple[ChipSpec, ...] = (
    ChipSpec("v4", "TPU v4", 32 * GiB, 275e12, 1228e9, 4),
    ChipSpec("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 4),
    ChipSpec("v5p", "TPU v5", 95 * 10**9, 459e12, 2765e9, 4),
    ChipSpec("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 4),
)


def chip_named(name: str) -> ChipSpec:
    """The chip of a topology name's generation (``v5p`` of ``v5p:4x4x8``)."""
    generation = name.split(":", 1)[0].lower()
    for chip in CHIPS:
        if chip.name == generation:
            return chip
    raise ValueError(f"unknown TPU generation {generation!r}; known: {', '.join(chip.name for chip in CHIPS)}")
