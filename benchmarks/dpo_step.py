"""Throughput and MFU of the DPO train step, with the reference on the fly and precomputed.

    python benchmarks/dpo_step.py                                   # hidden 256, 4 layers, vocab 32000
    python benchmarks/dpo_step.py --hidden 1024 --layers 8 --heads 8 --batch 2 --seq_len 256
    python benchmarks/dpo_step.py --reference precomputed --dtype float32,bfloat16 --json_out dpo.json

The step is the library's own: a ``GradientTrainer`` around ``dpo.make_loss_fn`` with the frozen
input the DPO trainer gives it, either the reference model's sharded parameters (``on_the_fly``: one
extra forward pass of the reference per step) or a [rows, 2] table of precomputed reference
log-probs gathered by ``example_index`` (``precomputed``: no reference compute in the step). The
batches are those of ``benchmarks/train_step.py`` (full-length random rows, responses on the second
half of each sequence) plus ``example_index``; the models are freshly initialised.

For each (reference, dtype) setting, after compiling ahead of time: ``--warmup`` untimed steps, then
``--steps`` timed ones; step time is the median.

* tokens/s = 2 * batch * seq_len / step time: the tokens of both sides of every pair, each counted
  once, whether or not a reference forward pass also reads them. The two modes therefore compare
  directly as "training tokens per second".
* model FLOPs = the policy's forward + backward over the 2 * batch rows (``common.StepFlops``) plus,
  on the fly, the reference's forward over the same rows (a third of that: 2 rather than 6 FLOPs per
  weight and token). MFU = model FLOPs / step time / the peak of a large matmul measured in this
  process around each run (the better of the measurements before and after).

Prints one JSON object on stdout (and to ``--json_out``) and a table on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import common
from benchmarks.train_step import default_intermediate_size, parse_mesh, synthetic_batch
from easyppo.algorithms import base, dpo
from easyppo.core import optim, sharding
from easyppo.models import llama, partitioning
from easyppo.run.config import base_config


@dataclasses.dataclass(frozen=True)
class Setting:
    reference: str  # one of dpo.REFERENCE_MODES
    dtype: str

    def label(self) -> str:
        return f"dpo {self.dtype} reference={self.reference}"


def _list_of(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--reference",
        type=_list_of,
        default=list(dpo.REFERENCE_MODES),
        help="on_the_fly, precomputed, or both (comma-separated)",
    )
    model = p.add_argument_group("model")
    model.add_argument("--hidden", type=int, default=256)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--kv_heads", type=int, default=None, help="default: --heads (multi-head attention)")
    model.add_argument(
        "--intermediate", type=int, default=None, help="default: LLaMA's 8/3 * hidden, rounded up to 256"
    )
    model.add_argument("--vocab", type=int, default=32000)
    model.add_argument("--dtype", type=_list_of, default=["float32"], help="compute dtype(s): float32, bfloat16")
    model.add_argument("--remat", default="none", help=f"one of {sorted(llama.REMAT_POLICIES)}")
    step = p.add_argument_group("step")
    step.add_argument("--seq_len", type=int, default=512)
    step.add_argument("--batch", type=int, default=4, help="preference pairs per step (2x rows)")
    step.add_argument(
        "--chunk_size",
        type=int,
        default=dpo.DPOOptions().logprob_chunk_size,
        help="log-prob chunk size, in sequence positions",
    )
    step.add_argument(
        "--mesh",
        type=parse_mesh,
        default=dict(sharding.default_config()),
        help="data,fsdp,tensor sizes (default 1,-1,1)",
    )
    timing = p.add_argument_group("timing")
    timing.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    timing.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    timing.add_argument("--peak_size", type=int, default=2048, help="side of the square matmul that measures the peak")
    timing.add_argument("--peak_repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json_out", default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)
    for name in args.reference:
        if name not in dpo.REFERENCE_MODES:
            p.error(f"--reference {name!r} is not one of {dpo.REFERENCE_MODES}")
    for name in args.dtype:
        if name not in ("float32", "bfloat16"):
            p.error(f"--dtype {name!r} is not float32 or bfloat16")
    if args.remat not in llama.REMAT_POLICIES:
        p.error(f"--remat {args.remat!r} is not one of {sorted(llama.REMAT_POLICIES)}")
    for flag in (
        "hidden",
        "layers",
        "heads",
        "vocab",
        "seq_len",
        "batch",
        "chunk_size",
        "steps",
        "warmup",
        "peak_size",
        "peak_repeats",
    ):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    return args


def model_config(args: argparse.Namespace, dtype: str) -> llama.LlamaConfig:
    return llama.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or default_intermediate_size(args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=args.seq_len,
        dtype=dtype,
        param_dtype="float32",
        remat=args.remat,
    )


def build_trainer(args: argparse.Namespace, setting: Setting, mesh: jax.sharding.Mesh) -> base.GradientTrainer:
    """The trainer ``dpo.make_trainer`` would build, from an architecture rather than a model config."""
    config = model_config(args, setting.dtype)
    partitioning.check_model_fits_mesh(config, mesh)
    optim_config = base_config("dpo").optim
    options = dpo.DPOOptions(logprob_chunk_size=args.chunk_size)
    module = llama.make_model(config, "causal_lm")

    def init(key):
        return llama.make_model(config, "causal_lm").init(key, jnp.zeros((1, 8), jnp.int32))["params"]

    params = sharding.sharded_init(init, jax.random.key(args.seed), mesh=mesh, rules=partitioning.LLAMA_RULES)
    if setting.reference == "on_the_fly":
        reference = sharding.sharded_init(
            init, jax.random.key(args.seed + 1), mesh=mesh, rules=partitioning.LLAMA_RULES
        )
        frozen, reference_model = {"reference_params": reference}, (module, config)
    else:
        table = np.random.default_rng(args.seed).normal(-args.seq_len, 10.0, (args.batch, 2)).astype(np.float32)
        frozen, reference_model = {"reference_logps": jax.device_put(table, NamedSharding(mesh, P()))}, None
    total_steps = args.warmup + args.steps + 1
    return base.GradientTrainer(
        kind="causal_lm",
        model_config=config,
        mesh=mesh,
        optimizer=optim.make_optimizer(optim_config, total_steps),
        schedule=optim.make_schedule(optim_config, total_steps),
        loss_fn=dpo.make_loss_fn(
            module, config, options, chunk_size=options.logprob_chunk_size, reference_model=reference_model
        ),
        frozen=frozen,
        initial_params=params,
        num_microbatches=1,
    )


def step_flops(config: llama.LlamaConfig, setting: Setting, *, batch: int, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one DPO step: policy forward + backward, plus the reference forward on the fly."""
    policy = common.llama_train_step_flops(config, rows=2 * batch, seq_len=seq_len, head="lm").total
    reference = policy / 3.0 if setting.reference == "on_the_fly" else 0.0
    return {"policy": policy, "reference": reference, "total": policy + reference}


def benchmark_setting(args: argparse.Namespace, setting: Setting, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    sharding.check_batch_fits_mesh(args.batch, mesh, name="--batch")
    trainer = build_trainer(args, setting, mesh)
    host_batch = synthetic_batch("rm", batch=args.batch, seq_len=args.seq_len, vocab=args.vocab, seed=args.seed)
    host_batch["example_index"] = np.arange(args.batch, dtype=np.int32)
    batch = sharding.host_local_to_global(host_batch, mesh)
    rng = jax.random.key(args.seed)
    state = trainer.init_state()
    lowered, lower_s = common.timed(lambda: trainer.lower_train_step(state, batch, rng))
    compiled, compile_s = common.timed(lowered.compile)
    metrics: dict[str, jax.Array] = {}

    def step():
        nonlocal state, metrics
        result = trainer.train_step(state, batch, rng, step=0)
        state, metrics = result.state, result.metrics
        return state, metrics

    first_step_s = common.seconds(step)
    timing = common.time_repeated(step, warmup=args.warmup - 1, repeats=args.steps)
    tokens = 2 * args.batch * args.seq_len
    flops = step_flops(trainer.model_config, setting, batch=args.batch, seq_len=args.seq_len)
    return {
        "setting": dataclasses.asdict(setting),
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "vocab": args.vocab,
            "intermediate": trainer.model_config.intermediate_size,
            "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
        },
        "batch_pairs": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens,
        "step_time": timing.as_dict(),
        "tokens_per_s": tokens / timing.median,
        "flops_per_step": flops,
        "achieved_flops_per_s": flops["total"] / timing.median,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "memory": common.compiled_memory(compiled),
        "loss": float(metrics["loss"]),
    }


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    mesh = sharding.make_mesh(args.mesh)
    measure_peak = lambda: common.matmul_peaks(size=args.peak_size, repeats=args.peak_repeats)
    peaks = [measure_peak()]
    results = []
    for reference, dtype in itertools.product(args.reference, args.dtype):
        results.append(benchmark_setting(args, Setting(reference, dtype), mesh))
        peaks.append(measure_peak())
    runs = []
    for result, before, after in zip(results, peaks, peaks[1:]):
        peak = {name: max(before[name], after[name]) for name in before}
        mfu = {name: result["achieved_flops_per_s"] / flops for name, flops in peak.items()}
        runs.append({**result, "peak_flops_per_s": peak, "mfu": mfu})
    return {
        "benchmark": "dpo_step",
        "command": command,
        "machine": common.machine_info(),
        "mesh": dict(mesh.shape),
        "peak_matmul": {"size": args.peak_size, "repeats": args.peak_repeats, "measurements": peaks},
        "process_max_rss_bytes": common.process_max_rss_bytes(),
        "runs": runs,
    }


_COLUMNS = common.step_columns(lambda r: Setting(**r["setting"]).label())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    report = run(args, command=" ".join(["python benchmarks/dpo_step.py", *argv]))
    title = common.model_title("DPO step", report, f"{args.batch} pairs x seq {args.seq_len}")
    common.emit(report, title + "\n" + common.format_table(report["runs"], _COLUMNS), json_out=args.json_out)
    return report


if __name__ == "__main__":
    main()
