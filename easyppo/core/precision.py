"""The compute-dtype policy: ``model.dtype = "auto"`` computes in bfloat16 where the hardware does so
natively, and in float32 elsewhere.

Master weights and optimizer state stay in ``model.param_dtype`` (float32 by default) either way;
only the matmuls and activations change precision. On the side-by-side workload
(docs/performance.md) bfloat16 compute was 15-20% faster on an Intel Xeon with AMX and slower on
AVX2-only CPUs (the performance issue's measurements, not repeated here), and no faster on a 2-core
AMD EPYC with AVX512-BF16 (measured 2026-11-30). TPUs and GPUs run bfloat16 matmuls at several times
their float32 rate.
"""

from __future__ import annotations

import functools

AUTO = "auto"
NATIVE_BF16_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")
NATIVE_BF16_CPU_FLAGS = ("amx_bf16",)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's CPU (Linux ``/proc/cpuinfo``; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bfloat16(platform: str, flags: frozenset[str]) -> bool:
    """Whether a ``platform`` ("cpu", "tpu", "gpu", ...) with CPU ``flags`` computes bfloat16 natively."""
    if platform in NATIVE_BF16_PLATFORMS:
        return True
    return platform == "cpu" and any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_dtype(name: str, *, platform: str | None = None, flags: frozenset[str] | None = None) -> str:
    """``name`` itself, or for ``"auto"`` bfloat16 or float32 by the policy above.

    ``platform`` defaults to JAX's default backend and ``flags`` to this machine's CPU flags.
    """
    if name != AUTO:
        return name
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "bfloat16" if native_bfloat16(platform, cpu_flags() if flags is None else flags) else "float32"
