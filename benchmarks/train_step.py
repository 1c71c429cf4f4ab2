"""Throughput and MFU of the SFT and reward-model train steps, exactly as the train loop runs them.

    python benchmarks/train_step.py                                  # SFT, hidden 256, 4 layers, vocab 32000
    python benchmarks/train_step.py --algorithm sft,rm --dtype float32,bfloat16
    python benchmarks/train_step.py --hidden 1024 --layers 8 --heads 8 --batch 2 --seq_len 256
    python benchmarks/train_step.py --remat none,full --chunk_size 128,512 --json_out sweep.json

The step is the library's own: a ``GradientTrainer`` built from ``sft.make_loss_fn`` /
``rm.make_loss_fn``, ``optim.make_optimizer`` and parameters from ``sharding.sharded_init`` on a
``sharding.make_mesh`` mesh, fed synthetic batches with the keys ``ExampleBatcher`` produces
(full-length sequences of random tokens; SFT trains on the second half of each sequence, as if it
were the response). Nothing about the step is re-implemented here.

``--algorithm``, ``--dtype``, ``--remat`` and ``--chunk_size`` take comma-separated lists; every
combination is benchmarked in this process (``--chunk_size`` only applies to SFT, whose log-probs
are computed in chunks of that many sequence positions over the vocabulary).

* compile: each setting's jitted step is lowered and compiled ahead of time (timed; the calls
  reuse that executable), which also gives XLA's per-device memory plan; then ``--warmup`` steps.
* timing: ``--rounds`` rounds, each running ``--steps`` steps of every setting in turn (each step
  waited for), with a matmul peak measured before the first round and after every round.
  Interleaving keeps comparisons fair on a shared machine whose speed drifts.
* tokens/s = rows * seq_len / median step time over all rounds (a preference pair is two rows).
* MFU = model FLOPs per step (``benchmarks.common.StepFlops``) / a round's median step time / the
  better of the two peaks measured around that round, against the float32 and the
  bf16-input/float32-accumulation peak; the median over rounds is reported. Best MFU = model
  FLOPs / the fastest step / the best peak of the run: the two least disturbed observations (other
  processes sharing the CPU can only slow either down).

Prints one JSON object on stdout (and to ``--json_out``) and a table on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from easyppo.algorithms import base, rm, sft
from easyppo.core import optim, sharding
from easyppo.models import llama, partitioning
from easyppo.run.config import base_config

ALGORITHMS = {"sft": sft, "rm": rm}
HEAD_OF_ALGORITHM: dict[str, common.Head] = {"sft": "lm", "rm": "score"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmarked combination of the swept options."""

    algorithm: str
    dtype: str
    remat: str
    chunk_size: int | None  # None for algorithms without a chunked log-prob (rm)

    def label(self) -> str:
        chunk = f" chunk={self.chunk_size}" if self.chunk_size is not None else ""
        return f"{self.algorithm} {self.dtype} remat={self.remat}{chunk}"


# -------------------------------------------------------------------------------------- arguments


def default_intermediate_size(hidden: int, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4 * hidden, rounded up to a multiple of 256 (4096 -> 11008)."""
    return multiple_of * math.ceil(8 * hidden / 3 / multiple_of)


def _list_of(kind: type) -> Callable[[str], list]:
    """An argparse type for a comma-separated list: ``"sft,rm"`` -> ``["sft", "rm"]``."""

    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item]

    return parse


def parse_mesh(text: str) -> dict[str, int]:
    """``"data,fsdp,tensor"`` sizes such as ``1,-1,1`` -> ``{"data": 1, "fsdp": -1, "tensor": 1}``."""
    sizes = text.split(",")
    if len(sizes) != len(sharding.MESH_AXES):
        raise argparse.ArgumentTypeError(f"--mesh={text!r} needs three sizes: data,fsdp,tensor (e.g. 1,-1,1)")
    try:
        return dict(zip(sharding.MESH_AXES, (int(size) for size in sizes)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--mesh={text!r}: sizes must be integers (-1: all remaining devices)"
        ) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--algorithm", type=_list_of(str), default=["sft"], help="sft, rm, or a list (sft,rm)")
    model = p.add_argument_group("model")
    model.add_argument("--hidden", type=int, default=256)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--kv_heads", type=int, default=None, help="default: --heads (multi-head attention)")
    model.add_argument(
        "--intermediate", type=int, default=None, help="default: LLaMA's 8/3 * hidden, rounded up to a multiple of 256"
    )
    model.add_argument("--vocab", type=int, default=32000)
    model.add_argument("--dtype", type=_list_of(str), default=["float32"], help="compute dtype(s): float32, bfloat16")
    model.add_argument(
        "--remat", type=_list_of(str), default=["none"], help=f"one or more of {sorted(llama.REMAT_POLICIES)}"
    )
    model.add_argument("--scan_layers", action="store_true", help="nn.scan over the decoder layers")
    step = p.add_argument_group("step")
    step.add_argument("--seq_len", type=int, default=512)
    step.add_argument("--batch", type=int, default=4, help="global batch: sequences (sft) or pairs (rm)")
    step.add_argument(
        "--chunk_size",
        type=_list_of(int),
        default=[sft.SFTOptions().logprob_chunk_size],
        help="sft log-prob chunk size(s), in sequence positions",
    )
    step.add_argument("--grad_accum", type=int, default=1, help="microbatches per step")
    step.add_argument(
        "--mesh",
        type=parse_mesh,
        default=dict(sharding.default_config()),
        help="data,fsdp,tensor sizes (default 1,-1,1; write --mesh=-1,1,1 when it starts with -)",
    )
    timing = p.add_argument_group("timing")
    timing.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds over all settings")
    timing.add_argument("--steps", type=int, default=2, help="timed steps per setting and round")
    timing.add_argument(
        "--warmup", type=int, default=1, help="untimed steps after compiling (the first is reported as first_step_s)"
    )
    timing.add_argument("--peak_size", type=int, default=2048, help="side of the square matmul that measures the peak")
    timing.add_argument("--peak_repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json_out", default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)

    for name in args.algorithm:
        if name not in ALGORITHMS:
            p.error(f"--algorithm {name!r} is not one of {sorted(ALGORITHMS)}")
    for name in args.dtype:
        if name not in ("float32", "bfloat16"):
            p.error(f"--dtype {name!r} is not float32 or bfloat16")
    for name in args.remat:
        if name not in llama.REMAT_POLICIES:
            p.error(f"--remat {name!r} is not one of {sorted(llama.REMAT_POLICIES)}")
    for flag in (
        "hidden",
        "layers",
        "heads",
        "vocab",
        "seq_len",
        "batch",
        "rounds",
        "steps",
        "warmup",
        "peak_size",
        "peak_repeats",
        "grad_accum",
    ):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if any(size < 1 for size in args.chunk_size):
        p.error(f"--chunk_size values must be >= 1, got {args.chunk_size}")
    return args


def settings_from_args(args: argparse.Namespace) -> list[Setting]:
    """Every combination of the swept options, in command-line order; rm ignores ``--chunk_size``."""
    settings = []
    for algorithm, dtype, remat, chunk in itertools.product(args.algorithm, args.dtype, args.remat, args.chunk_size):
        setting = Setting(algorithm, dtype, remat, chunk if algorithm == "sft" else None)
        if setting not in settings:
            settings.append(setting)
    return settings


def model_config(args: argparse.Namespace, setting: Setting) -> llama.LlamaConfig:
    return llama.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or default_intermediate_size(args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=args.seq_len,
        dtype=setting.dtype,
        param_dtype="float32",  # master weights and Adam state stay float32, as in training
        remat=setting.remat,
        scan_layers=args.scan_layers,
    )


# ------------------------------------------------------------------------------------------ the step


def build_trainer(
    config: llama.LlamaConfig,
    setting: Setting,
    mesh: jax.sharding.Mesh,
    *,
    total_steps: int,
    grad_accum: int,
    seed: int,
) -> base.GradientTrainer:
    """The library's trainer for ``setting.algorithm``, with freshly initialised, sharded parameters.

    The same pieces ``base.make_gradient_trainer`` assembles (loss from the algorithm's
    ``make_loss_fn``, the run config's default optimizer, parameters born sharded by the partition
    rules), except that the architecture is ``config`` itself rather than a preset named by a
    ``model`` config section, so any shape can be benchmarked.
    """
    module_of_algorithm = ALGORITHMS[setting.algorithm]
    algorithm = module_of_algorithm.ALGORITHM
    options = algorithm.options_type()
    if setting.chunk_size is not None:
        options = dataclasses.replace(options, logprob_chunk_size=setting.chunk_size)
    optim_config = base_config(setting.algorithm).optim

    partitioning.check_model_fits_mesh(config, mesh)
    kind = algorithm.model_kind
    module = llama.make_model(config, kind)

    def init(key):
        return llama.make_model(config, kind).init(key, jnp.zeros((1, 8), jnp.int32))["params"]

    params = sharding.sharded_init(init, jax.random.key(seed), mesh=mesh, rules=partitioning.LLAMA_RULES)
    return base.GradientTrainer(
        kind=kind,
        model_config=config,
        mesh=mesh,
        optimizer=optim.make_optimizer(optim_config, total_steps),
        schedule=optim.make_schedule(optim_config, total_steps),
        loss_fn=module_of_algorithm.make_loss_fn(module, config, options),
        frozen=None,
        initial_params=params,
        num_microbatches=grad_accum,
        metric_finalizer=getattr(module_of_algorithm, "finalize_metrics", None),
    )


def synthetic_batch(algorithm: str, *, batch: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random full-length rows with the keys and dtypes ``ExampleBatcher`` gives ``algorithm``.

    No padding, so every position is real work and tokens/s counts real tokens. The SFT loss mask
    (and each preference sequence's) covers the second half, as if it were the response.
    """
    rng = np.random.default_rng(seed)
    response = np.zeros((batch, seq_len), np.int32)
    response[:, seq_len // 2 :] = 1

    def sequences() -> dict[str, np.ndarray]:
        return {
            "input_ids": rng.integers(0, vocab, (batch, seq_len), dtype=np.int32),
            "attention_mask": np.ones((batch, seq_len), np.int32),
            "loss_mask": response.copy(),
            "position_ids": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        }

    example_mask = np.ones((batch,), np.int32)
    if ALGORITHMS[algorithm].ALGORITHM.data_kind == "sft":
        return {**sequences(), "example_mask": example_mask}
    chosen, rejected = sequences(), sequences()
    return {
        **{f"chosen_{key}": value for key, value in chosen.items()},
        **{f"rejected_{key}": value for key, value in rejected.items()},
        "margin": np.zeros((batch,), np.float32),
        "example_mask": example_mask,
    }


def rows_per_step(algorithm: str, batch: int) -> int:
    """Sequences through the model per step: a preference pair is two (chosen and rejected)."""
    return 2 * batch if ALGORITHMS[algorithm].ALGORITHM.data_kind == "preference" else batch


# ------------------------------------------------------------------------------------------ one run


class CompiledStep:
    """One setting's trainer, state and batch, compiled and warmed up, ready to be timed.

    ``step()`` runs the trainer's real ``train_step`` (which donates the state) and keeps the new
    state, so it can be called any number of times, interleaved with other settings' steps.
    """

    def __init__(self, args: argparse.Namespace, setting: Setting, mesh: jax.sharding.Mesh):
        self.setting = setting
        self.config = model_config(args, setting)
        self.rows = rows_per_step(setting.algorithm, args.batch)
        self.tokens = self.rows * args.seq_len
        self.flops = common.llama_train_step_flops(
            self.config, rows=self.rows, seq_len=args.seq_len, head=HEAD_OF_ALGORITHM[setting.algorithm]
        )
        sharding.check_batch_fits_mesh(args.batch, mesh, name="--batch")
        total_steps = args.warmup + args.rounds * args.steps
        self.trainer = build_trainer(
            self.config, setting, mesh, total_steps=total_steps, grad_accum=args.grad_accum, seed=args.seed
        )
        host_batch = synthetic_batch(
            setting.algorithm, batch=args.batch, seq_len=args.seq_len, vocab=args.vocab, seed=args.seed
        )
        self.batch = sharding.host_local_to_global(host_batch, mesh)
        self.rng = jax.random.key(args.seed)
        self.state = self.trainer.init_state()
        self.metrics: dict[str, jax.Array] = {}

        lowered, self.lower_s = common.timed(lambda: self.trainer.lower_train_step(self.state, self.batch, self.rng))
        compiled, self.compile_s = common.timed(lowered.compile)
        self.memory = common.compiled_memory(compiled)
        self.first_step_s = common.seconds(self.step)  # reuses the executable compiled above
        for _ in range(args.warmup - 1):
            jax.block_until_ready(self.step())

    def step(self) -> tuple[base.TrainState, dict]:
        result = self.trainer.train_step(self.state, self.batch, self.rng, step=0)
        self.state, self.metrics, self.skipped = result.state, result.metrics, result.skipped
        return self.state, self.metrics


def summarize(
    args: argparse.Namespace,
    compiled: CompiledStep,
    timing: common.Timing,
    rounds: list[dict],
    best_peak: dict[str, float],
) -> dict[str, Any]:
    """Everything measured for one setting.

    FLOP/s use the median over all timed steps. ``mfu`` is taken per round against that round's
    peak, and its median over the rounds is reported; ``mfu_best`` divides the fastest step by the
    best peak of the run. Another process can only slow a step or a peak measurement down, so
    these two extremes are the least disturbed observations: a second estimate that does not
    depend on how the load of a shared machine fell across rounds.
    """
    config = compiled.config
    return {
        "setting": dataclasses.asdict(compiled.setting),
        "model": {
            "hidden": config.hidden_size,
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "intermediate": config.intermediate_size,
            "vocab": config.vocab_size,
            "scan_layers": config.scan_layers,
            "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(compiled.state.params)),
        },
        "batch": args.batch,
        "rows_per_step": compiled.rows,
        "seq_len": args.seq_len,
        "grad_accum": args.grad_accum,
        "tokens_per_step": compiled.tokens,
        "step_time": timing.as_dict(),
        "tokens_per_s": compiled.tokens / timing.median,
        "flops_per_step": compiled.flops.as_dict(),
        "flops_per_token": compiled.flops.total / compiled.tokens,
        "achieved_flops_per_s": compiled.flops.total / timing.median,
        "mfu": {name: statistics.median(r["mfu"][name] for r in rounds) for name in common.PEAK_PRECISIONS},
        "mfu_best": {name: compiled.flops.total / timing.min / peak for name, peak in best_peak.items()},
        "rounds": rounds,
        "lower_s": compiled.lower_s,
        "compile_s": compiled.compile_s,
        "first_step_s": compiled.first_step_s,
        "memory": compiled.memory,
        "loss": float(compiled.metrics["loss"]),
        "skipped_steps": float(compiled.skipped),
    }


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Compiles every setting, then times them in interleaved rounds (``common.time_interleaved``)."""
    machine = common.machine_info()  # the date and load when the run starts
    mesh = sharding.make_mesh(args.mesh)
    steps = [CompiledStep(args, setting, mesh) for setting in settings_from_args(args)]
    measured = common.time_interleaved(
        [compiled.step for compiled in steps],
        rounds=args.rounds,
        repeats=args.steps,
        measure_peak=lambda: common.matmul_peaks(size=args.peak_size, repeats=args.peak_repeats),
    )
    return {
        "benchmark": "train_step",
        "command": command,
        "machine": {**machine, "load_average_1m_end": common.load_average()},
        "mesh": dict(mesh.shape),
        "peak_matmul": {"size": args.peak_size, "repeats": args.peak_repeats, "measurements": measured.peaks},
        "process_max_rss_bytes": common.process_max_rss_bytes(),
        "runs": [
            summarize(
                args,
                compiled,
                measured.timing(i),
                measured.mfu_by_round(i, compiled.flops.total),
                measured.best_peak(),
            )
            for i, compiled in enumerate(steps)
        ],
    }


# ------------------------------------------------------------------------------------------- output

_COLUMNS = common.step_columns(lambda r: Setting(**r["setting"]).label(), head_share=True, best_mfu=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    report = run(args, command=" ".join(["python benchmarks/train_step.py", *argv]))
    title = common.model_title("train step", report, f"batch {args.batch} x seq {args.seq_len}")
    common.emit(report, title + "\n" + common.format_table(report["runs"], _COLUMNS), json_out=args.json_out)
    return report


if __name__ == "__main__":
    main()
