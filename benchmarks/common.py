"""Measurement utilities shared by the benchmarks: the machine's own matmul peak, repeated timing,
model FLOPs of a LLaMA train step, compiled-memory figures, and JSON + table output.

Why a peak measured in-process: on a shared CPU the same matmul can run at half speed minutes
later, so an absolute FLOP/s figure says little. Dividing a workload's FLOP/s by the peak of a
large matmul measured in the same process, right before and after, gives a ratio (model FLOPs
utilisation, MFU) that is comparable across runs and machines.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp

from easyppo.models import llama
from easyppo.plan import flops as model_flops
from easyppo.plan.flops import matmul_params

T = TypeVar("T")

# --------------------------------------------------------------------------------------------- peak

# name -> (input dtype, accumulation/result dtype). "bfloat16" is how the model's matmuls run in
# bf16 compute: bf16 operands with float32 accumulation (``preferred_element_type``).
PEAK_PRECISIONS: dict[str, tuple[Any, Any]] = {
    "float32": (jnp.float32, jnp.float32),
    "bfloat16": (jnp.bfloat16, jnp.float32),
}


def matmul_peak(precision: str, *, size: int = 2048, repeats: int = 5) -> float:
    """Best observed FLOP/s of a ``size`` x ``size`` square matmul in ``precision`` (see PEAK_PRECISIONS).

    The best of ``repeats`` calls, not the median: the peak is what the machine *can* do, and on a
    shared machine every disturbance only makes a call slower. The inputs are made and the matmul
    compiled before timing.
    """
    if precision not in PEAK_PRECISIONS:
        raise ValueError(f"matmul_peak: precision {precision!r} is not one of {sorted(PEAK_PRECISIONS)}")
    if size < 1 or repeats < 1:
        raise ValueError(f"matmul_peak: size={size} and repeats={repeats} must both be >= 1")
    in_dtype, acc_dtype = PEAK_PRECISIONS[precision]
    a = jax.random.normal(jax.random.key(0), (size, size), in_dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), in_dtype)
    matmul = lambda: _matmul(a, b, preferred_element_type=acc_dtype)
    jax.block_until_ready(matmul())
    best = min(seconds(matmul) for _ in range(repeats))
    return 2.0 * size**3 / best


_matmul = jax.jit(jnp.matmul, static_argnames="preferred_element_type")  # compiled once per shape and dtype


def matmul_peaks(*, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """``matmul_peak`` for every precision in PEAK_PRECISIONS: ``{"float32": flops, "bfloat16": flops}``."""
    return {precision: matmul_peak(precision, size=size, repeats=repeats) for precision in PEAK_PRECISIONS}


# ------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its wall-clock seconds, including the device work it dispatched (blocks on it)."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return result, time.perf_counter() - start


def seconds(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of ``fn()``, including the device work it dispatched."""
    return timed(fn)[1]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Summary of repeated wall-clock measurements, in seconds.

    The median is the headline figure: it ignores a slow outlier (another process waking up) and a
    lucky fast one alike. ``min``/``max`` show how noisy the machine was while measuring.
    """

    median: float
    min: float
    max: float
    repeats: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Timing:
        if not samples:
            raise ValueError("Timing.from_samples: no samples")
        return cls(median=statistics.median(samples), min=min(samples), max=max(samples), repeats=len(samples))

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.05 means the repeats agreed within 5%."""
        return (self.max - self.min) / self.median

    def as_dict(self) -> dict[str, float]:
        return {
            "median_s": self.median,
            "min_s": self.min,
            "max_s": self.max,
            "repeats": self.repeats,
            "spread": self.spread,
        }


def time_samples(fn: Callable[[], Any], *, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn``, timed one by one (each waits for its device work)."""
    if repeats < 1:
        raise ValueError(f"time_samples: repeats={repeats} must be >= 1")
    return [seconds(fn) for _ in range(repeats)]


def time_repeated(fn: Callable[[], Any], *, warmup: int, repeats: int) -> Timing:
    """Calls ``fn`` ``warmup`` times untimed, then summarises ``repeats`` timed calls."""
    if warmup < 0:
        raise ValueError(f"time_repeated: warmup={warmup} must be >= 0")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    return Timing.from_samples(time_samples(fn, repeats=repeats))


@dataclasses.dataclass(frozen=True)
class InterleavedTiming:
    """Step times of several workloads measured in interleaved rounds, and the peaks around them.

    ``samples[w][r]`` holds workload ``w``'s step times in round ``r``; ``peaks[r]`` and
    ``peaks[r + 1]`` are the matmul peaks measured just before and just after round ``r``.
    """

    samples: list[list[list[float]]]
    peaks: list[dict[str, float]]

    def round_peaks(self) -> list[dict[str, float]]:
        """Per round, the better of the two peak measurements around it, per precision."""
        pairs = zip(self.peaks, self.peaks[1:])
        return [{name: max(before[name], after[name]) for name in before} for before, after in pairs]

    def best_peak(self) -> dict[str, float]:
        """The best peak measured at any point of the run, per precision."""
        return {name: max(peak[name] for peak in self.peaks) for name in self.peaks[0]}

    def timing(self, workload: int) -> Timing:
        """All of one workload's step times, over every round."""
        return Timing.from_samples([t for round_samples in self.samples[workload] for t in round_samples])

    def mfu_by_round(self, workload: int, flops_per_call: float) -> list[dict[str, Any]]:
        """Per round: the workload's median step time, the round's peak and MFU against each precision."""
        rounds = []
        for round_samples, peak in zip(self.samples[workload], self.round_peaks()):
            median = statistics.median(round_samples)
            rounds.append(
                {
                    "step_time_median_s": median,
                    "peak_flops_per_s": peak,
                    "mfu": {name: flops_per_call / median / flops for name, flops in peak.items()},
                }
            )
        return rounds


def time_interleaved(
    workloads: Sequence[Callable[[], Any]],
    *,
    rounds: int,
    repeats: int,
    measure_peak: Callable[[], dict[str, float]],
) -> InterleavedTiming:
    """Times every workload ``repeats`` times per round, round after round, measuring the peak
    before the first round and after each.

    Why interleave: when another process slows a shared machine down for a minute, every workload
    of that round pays, not just whichever happened to run then, so comparisons between workloads
    stay fair, and each round's MFU is taken against a peak measured next to it.
    """
    if rounds < 1:
        raise ValueError(f"time_interleaved: rounds={rounds} must be >= 1")
    samples: list[list[list[float]]] = [[] for _ in workloads]
    peaks = [measure_peak()]
    for _ in range(rounds):
        for fn, per_round in zip(workloads, samples):
            per_round.append(time_samples(fn, repeats=repeats))
        peaks.append(measure_peak())
    return InterleavedTiming(samples=samples, peaks=peaks)


# -------------------------------------------------------------------------------------------- FLOPs

Head = Literal["lm", "score"]


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one train step (forward + backward), split by where they are spent.

    Formula (the PaLM paper's "model FLOPs", appendix B), for ``rows`` sequences of ``seq_len``
    tokens, ``tokens = rows * seq_len``:

    * blocks    = 6 * tokens * L * (D * hd * (2 H + 2 KV) + 3 D F)   # q, k, v, o and the SwiGLU MLP
    * head      = 6 * tokens * D * V  (LM head)  or  6 * tokens * D  (scalar score head)
    * attention = 12 * rows * L * H * hd * seq_len^2                 # scores and weighted values

    A matmul of an [m, k] by a [k, n] matrix costs 2 m k n; the backward pass costs twice the
    forward (gradients for both operands), hence 6 = 3 * 2 per weight per token. Attention counts
    the full seq_len x seq_len square because that is what the fused attention computes under a
    causal mask. Not counted: recomputation (remat, and the chunked log-prob's recomputed logits in
    the backward pass), the embedding lookup (a gather), norms, softmax and the optimizer update;
    so these are *model* FLOPs, and MFU is the fraction of the peak that useful work reaches.
    """

    blocks: float
    head: float
    attention: float

    @property
    def total(self) -> float:
        return self.blocks + self.head + self.attention

    def as_dict(self) -> dict[str, float]:
        return {"blocks": self.blocks, "head": self.head, "attention": self.attention, "total": self.total}


def llama_train_step_flops(config: llama.LlamaConfig, *, rows: int, seq_len: int, head: Head) -> StepFlops:
    """Model FLOPs of one forward + backward pass over ``rows`` x ``seq_len`` tokens (see StepFlops)."""
    tokens = rows * seq_len
    weights = matmul_params(config, head)
    attention = 3.0 * model_flops.attention(config, rows, seq_len, seq_len)  # forward and backward
    return StepFlops(blocks=6.0 * tokens * weights["blocks"], head=6.0 * tokens * weights["head"], attention=attention)


# ------------------------------------------------------------------------------------------- memory


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """Per-device buffer sizes XLA planned for ``compiled``, or None where the backend gives none.

    ``peak_bytes`` = arguments + outputs - aliased (donated inputs reused as outputs) + temporaries:
    what the executable needs live at its peak, not counting its code.
    """
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if stats is None:
        return None
    figures = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
    }
    figures["peak_bytes"] = (
        figures["argument_bytes"] + figures["output_bytes"] - figures["alias_bytes"] + figures["temp_bytes"]
    )
    return figures


def process_max_rss_bytes() -> int:
    """The largest resident set this process has had so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# ------------------------------------------------------------------------------------------ machine


def load_average() -> float | None:
    """The 1-minute load average (runnable processes): above the core count, others compete for the CPU."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, JAX version and devices, and the load now."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1m": load_average(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


# ------------------------------------------------------------------------------------------- output


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a printed table: its title and how to render a row's value."""

    title: str
    render: Callable[[dict[str, Any]], str]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A plain-text table, right-aligned, one line per row."""
    cells = [[column.title for column in columns]] + [[column.render(row) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells)


def step_columns(
    label: Callable[[dict[str, Any]], str], *, head_share: bool = False, best_mfu: bool = False
) -> tuple[Column, ...]:
    """The columns of a train-step table (train_step.py, dpo_step.py): one row per setting.

    ``label`` renders a row's setting; ``head_share`` adds the LM head's share of the FLOPs and
    ``best_mfu`` the MFU against the best peak reading of the run.
    """
    columns = [
        Column("setting", label),
        Column("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}"),
        Column(
            "step ms (min-max)",
            lambda r: "{:.0f} ({:.0f}-{:.0f})".format(
                *(1e3 * r["step_time"][k] for k in ("median_s", "min_s", "max_s"))
            ),
        ),
        Column("GFLOP/step", lambda r: f"{r['flops_per_step']['total'] / 1e9:.1f}"),
    ]
    if head_share:
        columns.append(
            Column("head %", lambda r: f"{100 * r['flops_per_step']['head'] / r['flops_per_step']['total']:.0f}")
        )
    columns += [
        Column("GFLOP/s", lambda r: f"{r['achieved_flops_per_s'] / 1e9:.1f}"),
        Column("MFU f32", lambda r: f"{r['mfu']['float32']:.2f}"),
        Column("MFU bf16", lambda r: f"{r['mfu']['bfloat16']:.2f}"),
    ]
    if best_mfu:
        columns += [
            Column("best MFU f32", lambda r: f"{r['mfu_best']['float32']:.2f}"),
            Column("best MFU bf16", lambda r: f"{r['mfu_best']['bfloat16']:.2f}"),
        ]
    columns += [
        Column("compile s", lambda r: f"{r['compile_s']:.1f}"),
        Column("peak MiB", lambda r: f"{r['memory']['peak_bytes'] / 2**20:.0f}" if r["memory"] else "-"),
    ]
    return tuple(columns)


def model_title(what: str, report: dict[str, Any], workload: str) -> str:
    """``"<what>: 19.5M params (hidden 256, 4 layers, vocab 32000), <workload>, mesh {...}"``."""
    model = report["runs"][0]["model"]
    return (
        f"{what}: {model['params'] / 1e6:.1f}M params (hidden {model['hidden']}, {model['layers']} layers, "
        f"vocab {model['vocab']}), {workload}, mesh {report['mesh']}"
    )


def emit(report: dict[str, Any], table: str, *, json_out: str | None = None) -> None:
    """Writes ``report`` as one JSON line to stdout (and to ``json_out``), and ``table`` to stderr.

    JSON alone on stdout keeps the output machine-readable (``... | jq``) while a person watching
    the terminal still sees the table.
    """
    text = json.dumps(report, sort_keys=True)
    if json_out:
        with open(json_out, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
    print(table, file=sys.stderr, flush=True)
