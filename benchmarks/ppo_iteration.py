"""Time of one PPO iteration split into rollout, scoring and update, with each phase's model FLOPs as a
share of this machine's matmul peak.

    python benchmarks/ppo_iteration.py                                # 8 prompts, 128 + 128 tokens
    python benchmarks/ppo_iteration.py --prompts 64 --repeats 2
    python benchmarks/ppo_iteration.py --samples-per-prompt 2 --ppo-epochs 2 --num-minibatches 2 --grad-accum 2
    python benchmarks/ppo_iteration.py --reward-hidden-size 512 --reward-num-layers 8   # a larger reward model

The iteration is the library's own: ``loop.trainer_for`` builds a ``PPOTrainer`` from a PPO run config
made here (random-init models of the chosen shape for the policy and reference, and for the reward
and value models, which share one shape: the policy's unless ``--reward-*`` says otherwise), and the
three jitted programs ``train_step`` chains are timed one by one, waiting for each to finish:

* **rollout**: ``trainer.rollout`` samples ``--new-tokens`` tokens for ``--samples-per-prompt``
  samples of each of ``--prompts`` prompts of ``--prompt-len`` random tokens (prefill + decode loop);
* **scoring**: ``trainer.score``: policy, reference, value and reward forward passes over prompt +
  response, then KL-shaped rewards and GAE;
* **update**: ``trainer.update``: ``--ppo-epochs`` x ``--num-minibatches`` optimizer steps of the
  policy and of the value model, each over ``--grad-accum`` microbatches (it donates the state, so
  each iteration continues from the last one's state, as in training).

Stop tokens are disabled (``stop_at_eos=False`` and no extra stop ids), so every row generates every
token and the work per iteration is fixed; the benchmark fails if a row stops early. The trainer
still needs ``data.tokenizer_path`` (it resolves pad and end-of-turn ids from it): the bundled
``easyppo/configs/demo_data/tokenizer.model`` is used; it reads no text, so the models may have any vocabulary.

Measurement: each phase is lowered and compiled ahead of time (``compile_s``; the calls reuse that
executable, and its XLA memory plan is reported), then one untimed warm-up iteration, then
``--repeats`` timed iterations. Per phase the median, min and max over the repeats are reported, and
its share: its median over the sum of the three medians (medians of sums and sums of medians differ
slightly). The iteration's wall clock is measured around all three phases, so in each iteration the
phases plus host gaps add up to it.
The float32 and bf16 matmul peaks are measured before the first and after the last timed iteration;
the better reading counts (the machine is shared: a slow reading would flatter the ratio).

Model FLOPs (matmuls only, ``benchmarks.common``'s conventions: 2 per weight and token forward, 6
forward + backward; attention over the full T x T square of a teacher-forced pass):

* rollout = policy prefill over the prompt (LM head at its last position only) + ``new_tokens - 1``
  one-token decode steps (LM head every step; attention over the real context, prompt + t tokens);
* scoring = policy and reference forwards over prompt + response (LM head over the response
  positions only: the chunked log-prob projects nothing else) + value and reward forwards (score
  head everywhere, one column);
* update = ``ppo_epochs`` x (policy forward + backward + value forward + backward) over every
  rollout row (3x the forward; gradient accumulation changes the split, not the work).

Not counted: sampling over the vocabulary (softmax, Gumbel noise), the log-softmax and its
recomputation in the backward pass, norms, GAE and the optimizer updates. MFU = model FLOPs / median
phase seconds / peak, against both the float32 and the bf16-input peak.

Prints one JSON object on stdout (and to ``--json-out``) and a table on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import common
from benchmarks.train_step import default_intermediate_size
from easyppo.algorithms import ppo
from easyppo.algorithms.rl.options import RLOptions
from easyppo.algorithms.rl.rollout import Rollout
from easyppo.algorithms.rl.update import RLState
from easyppo.core import sharding
from easyppo.models import generation, llama
from easyppo.plan import flops as model_flops
from easyppo.run import config as run_config
from easyppo.run import loop

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = REPO / "easyppo" / "configs" / "demo_data" / "tokenizer.model"
PAD_ID = 0
PHASES = ("rollout", "scoring", "update")


# -------------------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = p.add_argument_group("models (policy and reference; reward and value the same unless --reward-*)")
    model.add_argument("--preset", default=None, help="a llama preset name instead of the shape flags")
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--num-layers", type=int, default=4)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--kv-heads", type=int, default=None, help="default: --heads (multi-head attention)")
    model.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="default: LLaMA's 8/3 * hidden, rounded up to a multiple of 256",
    )
    model.add_argument("--vocab-size", type=int, default=32000)
    model.add_argument("--reward-hidden-size", type=int, default=None, help="reward/value width (default: policy's)")
    model.add_argument("--reward-num-layers", type=int, default=None, help="reward/value depth (default: policy's)")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype, all models")
    step = p.add_argument_group("iteration")
    step.add_argument("--prompts", type=int, default=8, help="prompts per iteration (data.global_batch_size)")
    step.add_argument("--prompt-len", type=int, default=128, help="random tokens per prompt, no padding")
    step.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (all of them)")
    step.add_argument("--samples-per-prompt", type=int, default=1)
    step.add_argument("--ppo-epochs", type=int, default=1)
    step.add_argument("--num-minibatches", type=int, default=1)
    step.add_argument("--grad-accum", type=int, default=1, help="microbatches per optimizer step")
    step.add_argument("--temperature", type=float, default=RLOptions().sampling.temperature)
    step.add_argument("--devices", type=int, default=1, help="first N devices, one fsdp mesh axis over them")
    timing = p.add_argument_group("timing")
    timing.add_argument("--repeats", type=int, default=3, help="timed iterations after one warm-up iteration")
    timing.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul that measures the peak")
    timing.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)

    positive = (
        "hidden_size",
        "num_layers",
        "heads",
        "vocab_size",
        "prompts",
        "prompt_len",
        "new_tokens",
        "samples_per_prompt",
        "ppo_epochs",
        "num_minibatches",
        "grad_accum",
        "devices",
        "repeats",
        "peak_size",
        "peak_repeats",
    )
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("reward_hidden_size", "reward_num_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.devices > jax.device_count():
        p.error(f"--devices={args.devices}, but only {jax.device_count()} devices are available")
    rows = args.prompts * args.samples_per_prompt
    if args.prompts % args.devices:
        p.error(f"--prompts={args.prompts} must be divisible by --devices={args.devices}")
    if rows % args.num_minibatches:
        p.error(
            f"the rollout's {rows} rows (--prompts x --samples-per-prompt) do not split into "
            f"--num-minibatches={args.num_minibatches}"
        )
    if (rows // args.num_minibatches) % (args.grad_accum * args.devices):
        p.error(
            f"a minibatch of {rows // args.num_minibatches} rows does not split into --grad-accum="
            f"{args.grad_accum} microbatches of a multiple of --devices={args.devices} rows"
        )
    return args


# ------------------------------------------------------------------------------------------ config


def _architecture_overrides(args: argparse.Namespace, *, hidden: int | None, layers: int | None) -> dict[str, Any]:
    """``model`` config fields for random init of the chosen shape (``easyppo.weights.loading`` applies
    them to ``preset``). ``hidden`` / ``layers``: a different width or depth (the reward model's)."""
    if args.preset:
        base = llama.get_preset(args.preset)
        fields: dict[str, Any] = {"preset": args.preset}
        if hidden and hidden != base.hidden_size:
            fields.update(hidden_size=hidden, intermediate_size=default_intermediate_size(hidden))
        if layers:
            fields["num_hidden_layers"] = layers
        return fields
    width = hidden or args.hidden_size
    return {
        "preset": "tiny",  # every architecture field below replaces the preset's
        "vocab_size": args.vocab_size,
        "hidden_size": width,
        "intermediate_size": (
            args.intermediate_size
            if args.intermediate_size and width == args.hidden_size
            else default_intermediate_size(width)
        ),
        "num_hidden_layers": layers or args.num_layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads or args.heads,
        "max_position_embeddings": args.prompt_len + args.new_tokens,
        "pad_token_id": PAD_ID,
    }


def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The PPO run config of the benchmarked iteration, checked by ``easyppo.run.config.validate`` as the
    train loop would check it."""
    c = run_config.base_config("ppo")
    c.model.update(init_from="", dtype=args.dtype, **_architecture_overrides(args, hidden=None, layers=None))
    c.ppo.reward_model.update(
        init_from="",
        dtype=args.dtype,
        **_architecture_overrides(args, hidden=args.reward_hidden_size, layers=args.reward_num_layers),
    )
    c.ppo.value_model.dtype = args.dtype  # its architecture and first weights are the reward model's
    c.seed = args.seed
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.data.tokenizer_path = str(DEMO_TOKENIZER)
    c.data.pad_id = PAD_ID
    c.data.max_prompt_len = args.prompt_len
    c.data.global_batch_size = args.prompts
    c.train.grad_accum_steps = args.grad_accum
    c.train.num_steps = args.repeats + 1
    c.ppo.samples_per_prompt = args.samples_per_prompt
    c.ppo.ppo_epochs = args.ppo_epochs
    c.ppo.num_minibatches = args.num_minibatches
    c.ppo.sampling.max_new_tokens = args.new_tokens
    c.ppo.sampling.temperature = args.temperature
    c.ppo.sampling.stop_at_eos = False
    run_config.validate(c, num_devices=args.devices)
    return c


def prompt_batch(args: argparse.Namespace, vocab_size: int) -> dict[str, np.ndarray]:
    """A host batch with the keys ``ExampleBatcher`` gives prompt rows: full-length random prompts."""
    rng = np.random.default_rng(args.seed)
    shape = (args.prompts, args.prompt_len)
    return {
        "prompt_input_ids": rng.integers(PAD_ID + 1, vocab_size, shape, dtype=np.int32),
        "prompt_attention_mask": np.ones(shape, np.int32),
        "prompt_position_ids": np.broadcast_to(np.arange(args.prompt_len, dtype=np.int32), shape).copy(),
        "example_mask": np.ones(args.prompts, np.int32),
        "example_index": np.arange(args.prompts, dtype=np.int32),
    }


# ------------------------------------------------------------------------------------------- FLOPs


def rollout_flops(config: llama.LlamaConfig, *, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Prefill (LM head at the last prompt position) + ``new_tokens - 1`` one-token decode steps, step
    ``t`` attending to the ``prompt_len + t`` positions in the cache."""
    prefill = model_flops.forward(config, rows=rows, seq_len=prompt_len, head_positions=1, head="lm")
    weights = common.matmul_params(config, "lm")
    steps = new_tokens - 1
    contexts = steps * prompt_len + steps * (steps + 1) / 2  # sum over t = 1 .. steps of (prompt_len + t)
    decode = 2.0 * rows * steps * (weights["blocks"] + weights["head"]) + model_flops.attention(
        config, rows, 1, contexts
    )
    return prefill + decode


def phase_flops(
    policy: llama.LlamaConfig,
    scorer: llama.LlamaConfig,
    *,
    rows: int,
    prompt_len: int,
    new_tokens: int,
    ppo_epochs: int,
) -> dict[str, float]:
    """Model FLOPs of each phase of one iteration (module docstring); ``scorer`` is the reward and value
    models' architecture."""
    seq_len = prompt_len + new_tokens
    policy_forward = model_flops.forward(policy, rows=rows, seq_len=seq_len, head_positions=new_tokens, head="lm")
    scorer_forward = model_flops.forward(scorer, rows=rows, seq_len=seq_len, head_positions=seq_len, head="score")
    return {
        "rollout": rollout_flops(policy, rows=rows, prompt_len=prompt_len, new_tokens=new_tokens),
        "scoring": 2 * policy_forward + 2 * scorer_forward,  # policy, reference; value, reward
        "update": ppo_epochs * 3 * (policy_forward + scorer_forward),
    }


def phase_tokens(*, rows: int, prompt_len: int, new_tokens: int, ppo_epochs: int) -> dict[str, tuple[int, str]]:
    """Tokens each phase processes, and which (the unit of its tokens/s): new tokens generated; prompt +
    response tokens times the 4 forward passes; prompt + response tokens times the 2 trained models
    times the epochs, each through a forward and a backward pass."""
    seq_len = prompt_len + new_tokens
    return {
        "rollout": (rows * new_tokens, "new"),
        "scoring": (4 * rows * seq_len, "x 4 forwards"),
        "update": (ppo_epochs * 2 * rows * seq_len, "x 2 models x epochs, fwd+bwd"),
    }


# ------------------------------------------------------------------------------------------ timing


def no_host_rewards(sampled: Rollout) -> jax.Array:
    """PPO's rewards all come from the reward model on the device: the host sources add zeros."""
    return jnp.zeros(sampled.row_mask.shape, jnp.float32)


@dataclasses.dataclass
class Iteration:
    """One PPO iteration as three separately timed phases, carrying the trainer state between them."""

    trainer: ppo.PPOTrainer
    state: RLState
    batch: dict[str, jax.Array]
    rng: jax.Array
    sampling: generation.SamplingConfig  # the trainer's, with every stop token disabled

    def phases(self, index: int):
        """The three phases of iteration ``index`` as zero-argument calls, in order; each uses the
        previous one's output, and ``update`` replaces ``self.state`` (its input is donated)."""
        trainer, key = self.trainer, jax.random.fold_in(self.rng, index)
        outputs: dict[str, Any] = {}

        def rollout():
            outputs["rollout"] = trainer.rollout(
                self.state.params,
                self.batch,
                jax.random.fold_in(key, 0),
                sampling=self.sampling,
                samples_per_prompt=trainer.options.samples_per_prompt,
            )
            return outputs["rollout"]

        def scoring():
            state = self.state
            sampled = outputs["rollout"]
            outputs["scoring"] = trainer.score(
                state.params, state.value_params, state.kl_coef, trainer.frozen, sampled, no_host_rewards(sampled)
            )
            return outputs["scoring"]

        def update():
            scored = outputs["scoring"]
            self.state, update_metrics = trainer.update(
                self.state,
                scored.experience,
                scored.metrics["kl_per_sequence"],
                jax.random.fold_in(key, 1),
                train_policy=True,
            )
            return self.state, update_metrics

        return {"rollout": rollout, "scoring": scoring, "update": update}, outputs

    def lower(self, phase: str, outputs: dict[str, Any]) -> jax.stages.Lowered:
        """The phase's own jitted program lowered for this iteration's inputs (the calls reuse the
        compiled executable)."""
        trainer, key = self.trainer, jax.random.key(0)
        if phase == "rollout":
            return trainer.rollout.lower(
                self.state.params,
                self.batch,
                key,
                sampling=self.sampling,
                samples_per_prompt=trainer.options.samples_per_prompt,
            )
        if phase == "scoring":
            state = self.state
            sampled = outputs["rollout"]
            return trainer.score.lower(
                state.params, state.value_params, state.kl_coef, trainer.frozen, sampled, no_host_rewards(sampled)
            )
        scored = outputs["scoring"]
        return trainer.update.lower(
            self.state, scored.experience, scored.metrics["kl_per_sequence"], key, train_policy=True
        )


def warm_up(iteration: Iteration) -> dict[str, dict[str, Any]]:
    """Compiles each phase ahead of time and runs it once: compile seconds, first-call seconds and
    XLA's memory plan per phase."""
    calls, outputs = iteration.phases(0)
    figures = {}
    for phase in PHASES:
        compiled, compile_s = common.timed(iteration.lower(phase, outputs).compile)
        _, first_call_s = common.timed(calls[phase])
        figures[phase] = {
            "compile_s": compile_s,
            "first_call_s": first_call_s,
            "memory": common.compiled_memory(compiled),
        }
    return figures


def time_iterations(iteration: Iteration, repeats: int) -> tuple[dict[str, list[float]], list[float], dict]:
    """Seconds of each phase and of each whole iteration over ``repeats`` iterations, and the last
    iteration's rollout and scoring outputs."""
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    totals = []
    for index in range(1, repeats + 1):  # iteration 0 is the warm-up
        calls, outputs = iteration.phases(index)
        start = time.perf_counter()
        for phase in PHASES:
            samples[phase].append(common.seconds(calls[phase]))
        totals.append(time.perf_counter() - start)
    return samples, totals, outputs


def check_full_length(rollout: Rollout, new_tokens: int) -> None:
    generated, expected = int(rollout.response_mask.sum()), rollout.response_mask.shape[0] * new_tokens
    if generated != expected:
        raise RuntimeError(
            f"the rollout generated {generated} tokens, not {expected}: a row stopped early, so the "
            "iteration's work would depend on the samples"
        )


# ------------------------------------------------------------------------------------------ report


def _model_summary(config: llama.LlamaConfig) -> dict[str, Any]:
    return {
        "params": config.num_params(),
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
        "dtype": config.dtype,
    }


def _ratios(flops: float, seconds: float, peak: dict[str, float]) -> dict[str, Any]:
    return {
        "flops": flops,
        "flops_per_s": flops / seconds,
        "mfu": {name: flops / seconds / value for name, value in peak.items()},
    }


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    load_start = common.load_average()
    config = build_config(args)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[: args.devices])
    trainer = loop.trainer_for(config, mesh, config.train.num_steps)
    sampling = dataclasses.replace(trainer.sampling, stop_at_eos=False, stop_token_ids=())
    batch = sharding.host_local_to_global(prompt_batch(args, trainer.models.policy.vocab_size), mesh)
    iteration = Iteration(trainer, trainer.init_state(), batch, jax.random.key(args.seed), sampling)

    measure_peak = lambda: common.matmul_peaks(size=args.peak_size, repeats=args.peak_repeats)
    with jax.set_mesh(mesh):
        warm = warm_up(iteration)
        peaks = [measure_peak()]
        samples, totals, outputs = time_iterations(iteration, args.repeats)
        peaks.append(measure_peak())
    check_full_length(outputs["rollout"], args.new_tokens)
    peak = {name: max(p[name] for p in peaks) for name in peaks[0]}

    rows = args.prompts * args.samples_per_prompt
    shape = {"rows": rows, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "ppo_epochs": args.ppo_epochs}
    flops = phase_flops(trainer.models.policy, trainer.models.reward, **shape)
    tokens = phase_tokens(**shape)
    total = common.Timing.from_samples(totals)
    timings = {phase: common.Timing.from_samples(samples[phase]) for phase in PHASES}
    phase_sum = sum(timing.median for timing in timings.values())
    phases = {}
    for phase, timing in timings.items():
        count, unit = tokens[phase]
        phases[phase] = {
            "time": timing.as_dict(),
            "share": timing.median / phase_sum,
            "tokens": count,
            "tokens_unit": unit,
            "tokens_per_s": count / timing.median,
            **_ratios(flops[phase], timing.median, peak),
            **warm[phase],
        }
    metrics = jax.device_get(outputs["scoring"].metrics)
    return {
        "benchmark": "ppo_iteration",
        "command": command,
        "machine": common.machine_info(),
        "load_average_1m": {"start": load_start, "end": common.load_average()},
        "mesh": dict(mesh.shape),
        "models": {
            "policy": _model_summary(trainer.models.policy),
            "reward_value": _model_summary(trainer.models.reward),
        },
        "iteration_shape": {
            "prompts": args.prompts,
            "samples_per_prompt": args.samples_per_prompt,
            "rollout_rows": rows,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "ppo_epochs": args.ppo_epochs,
            "num_minibatches": args.num_minibatches,
            "grad_accum": args.grad_accum,
            "temperature": args.temperature,
        },
        "peak_matmul": {
            "size": args.peak_size,
            "repeats": args.peak_repeats,
            "measurements": peaks,
            "best_flops_per_s": peak,
        },
        "phases": phases,
        "iteration": {
            "time": total.as_dict(),
            "phase_sum_s": phase_sum,
            "new_tokens_per_s": rows * args.new_tokens / total.median,
            "compile_s": sum(p["compile_s"] for p in phases.values()),
            **_ratios(sum(flops.values()), total.median, peak),
        },
        "rollout_metrics": {
            key: float(metrics[key]) for key in ("response_length", "eos_rate", "score", "kl_per_sequence")
        },
        "process_max_rss_bytes": common.process_max_rss_bytes(),
    }


def _seconds_cell(entry: dict[str, Any]) -> str:
    t = entry["time"]
    return f"{t['median_s']:.2f} ({t['min_s']:.2f}-{t['max_s']:.2f})"


_COLUMNS = (
    common.Column("phase", lambda r: r["name"]),
    common.Column("s: median (min-max)", _seconds_cell),
    common.Column("share", lambda r: f"{100 * r['share']:.0f}%"),
    common.Column("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"),
    common.Column("tokens counted", lambda r: r.get("tokens_unit", "-")),
    common.Column("GFLOP", lambda r: f"{r['flops'] / 1e9:.1f}"),
    common.Column("GFLOP/s", lambda r: f"{r['flops_per_s'] / 1e9:.1f}"),
    common.Column("MFU f32", lambda r: f"{r['mfu']['float32']:.2f}"),
    common.Column("MFU bf16", lambda r: f"{r['mfu']['bfloat16']:.2f}"),
    common.Column("compile s", lambda r: f"{r['compile_s']:.1f}"),
    common.Column("XLA MiB", lambda r: f"{r['memory']['peak_bytes'] / 2**20:.0f}" if r.get("memory") else "-"),
)


def format_report(report: dict[str, Any]) -> str:
    policy, scorer, shape = report["models"]["policy"], report["models"]["reward_value"], report["iteration_shape"]
    load = report["load_average_1m"]
    title = (
        f"PPO iteration: policy {policy['params'] / 1e6:.1f}M (hidden {policy['hidden']}, {policy['layers']} layers, "
        f"vocab {policy['vocab']}, {policy['dtype']}), reward/value {scorer['params'] / 1e6:.1f}M; "
        f"{shape['prompts']} prompts x {shape['samples_per_prompt']} samples, {shape['prompt_len']} + "
        f"{shape['new_tokens']} tokens, {shape['ppo_epochs']} epoch(s) x {shape['num_minibatches']} minibatch(es), "
        f"grad accum {shape['grad_accum']}; mesh {report['mesh']}; peak f32 "
        f"{report['peak_matmul']['best_flops_per_s']['float32'] / 1e9:.0f} GFLOP/s; load {load['start']:.1f}-{load['end']:.1f}"
    )
    rows = [{"name": name, **entry} for name, entry in report["phases"].items()]
    iteration = report["iteration"]
    rows.append(
        {
            "name": "iteration",
            **iteration,
            "share": 1.0,
            "tokens_per_s": iteration["new_tokens_per_s"],
            "tokens_unit": "new",
        }
    )
    return title + "\n" + common.format_table(rows, _COLUMNS)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    report = run(args, command=" ".join(["python benchmarks/ppo_iteration.py", *argv]))
    common.emit(report, format_report(report), json_out=args.json_out)
    return report


if __name__ == "__main__":
    main()
