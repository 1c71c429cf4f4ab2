"""What a planner needs to know about each accelerator chip: memory, peak bf16 compute, memory bandwidth.

Peak compute and bandwidth are per device (a chip; a TensorCore on v3), from Google's Cloud TPU
system-architecture pages (cloud.google.com/tpu/docs/v3, /v4, /v5e, /v5p, /v6e; read 2026-11-30). They are the vendor's peaks: a
roofline estimate built on them is a lower bound on step time, never a measurement.

Memory is what the TPU compiler lets one program use, which is below the HBM the vendor lists (32
GiB on v4 and v6e, 16 GiB on v5e) by what the runtime keeps for itself. It was measured by compiling
a program too large for each chip with libtpu 0.0.42 (the version jax 0.10 pins) and reading the
limit from the compiler's error: "exceeds available HBM (30.75G)" on v4, 15.75G on v5e, 95.74G on
v5p, 31.25G on v6e and 15.48G per v3 TensorCore (G: GiB; v5p's listed "95 GB" is evidently a
rounded figure). v3 is here for one reason: the published anchor (Tulu 2.5's PPO on a v3-256).

v4 and v5p chips hold two TensorCores that JAX drives as one device ("megacore"); libtpu describes a
v4 slice per core unless asked for megacore chips, which is what a pod runs.
"""

from __future__ import annotations

import dataclasses

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One accelerator chip: ``device_kind`` is what ``jax.Device.device_kind`` reports for it."""

    name: str
    device_kind: str
    hbm_bytes: int  # what one program may use (module doc)
    peak_bf16_flops: float | None  # per second; None: unknown (a memory budget only, see with_memory)
    hbm_bytes_per_s: float | None
    chips_per_host: int
    megacore: bool = False

    @property
    def has_speed(self) -> bool:
        return bool(self.peak_bf16_flops and self.hbm_bytes_per_s)

    def roofline_seconds(self, flops: float, bytes_accessed: float) -> float | None:
        """The larger of compute time at peak and memory time at full bandwidth (None: speeds unknown)."""
        if not self.has_speed:
            return None
        return max(flops / self.peak_bf16_flops, bytes_accessed / self.hbm_bytes_per_s)


CHIPS: tuple[ChipSpec, ...] = (
    # v3 runs one device per TensorCore: half a chip's 123 TFLOP/s, 32 GiB and 900 GB/s each.
    ChipSpec("v3", "TPU v3", int(15.48 * GiB), 61.5e12, 450e9, 8),
    ChipSpec("v4", "TPU v4", int(30.75 * GiB), 275e12, 1228e9, 4, megacore=True),
    ChipSpec("v5e", "TPU v5 lite", int(15.75 * GiB), 197e12, 819e9, 4),
    ChipSpec("v5p", "TPU v5", int(95.74 * GiB), 459e12, 2765e9, 4, megacore=True),
    ChipSpec("v6e", "TPU v6 lite", int(31.25 * GiB), 918e12, 1640e9, 4),
)


def chip_named(name: str) -> ChipSpec:
    """The chip of a topology name's generation (``v5p`` of ``v5p:4x4x8``)."""
    generation = name.split(":", 1)[0].lower()
    for chip in CHIPS:
        if chip.name == generation:
            return chip
    raise ValueError(f"unknown TPU generation {generation!r}; known: {', '.join(chip.name for chip in CHIPS)}")


def with_memory(chip: ChipSpec | None, hbm_bytes: int) -> ChipSpec:
    """``chip`` with another memory size (``easyppo plan --hbm_gib``): a partitioned chip, memory kept
    free for something else, or a budget for this machine's own devices (whose speed is not known)."""
    if chip is None:
        return ChipSpec("local", "local", hbm_bytes, None, None, 1)
    return dataclasses.replace(chip, hbm_bytes=hbm_bytes)
