"""The peers harness's canonical workloads run through easyppo's public API (../shared/peers).

    python benchmarks/canonical.py --workload dpo [--reference precomputed] [--dtype bfloat16]
    python benchmarks/canonical.py --workload rm  [--dtype bfloat16]
    python benchmarks/canonical.py --workload ppo [--dtype bfloat16]

``../shared/peers/run_all.sh`` runs this script for its easyppo entries and ``make_table.py`` reads the
one JSON line it prints last (the same fields as the harness's ``_jax_common.emit`` rows), so easyppo is
measured beside TRL and Tunix on the same work as its API changes.

The workload (the harness's defaults): a random-init LLaMA with vocab 32000, hidden 256, intermediate
688, 4 layers, 4 heads and 4 KV heads, RoPE theta 10000, RMSNorm eps 1e-6, untied head, float32
parameters, seed 0, saved as a Hugging Face directory and loaded by ``model.init_from`` the way a user
starts a run (the policy and its reference share it; the reward and value models share a scalar-head
one). AdamW lr 1e-6 constant, betas 0.9/0.999, eps 1e-8, no weight decay.

* **dpo** / **rm**: 4 pairs of prompt 128 + response 128 random ids in [4, vocab), no padding,
  sigmoid DPO loss with beta 0.1 (reference on the fly, or ``--reference precomputed``: the run's
  one-off reference pass, not timed) / the Bradley-Terry loss; gradient clipping 1.0. The rows are an
  already tokenised dataset behind easyppo's own batcher and iterator. A step is the host batch placed
  on the mesh plus ``trainer.train_step``, waited for; median of 10 after 3 warm-up steps.
* **ppo**: 8 prompts of 64 random ids, 64 sampled tokens each (temperature 1, no stop tokens), k1 KL
  0.05, GAE (1.0, 0.95), 1 epoch x 1 minibatch, clip 0.2 / 0.2, vf_coef 0.1, no gradient clipping.
  Phases as ``train_step`` runs them (rollout; judge + assemble as one ``score`` program; update),
  each waited for; median of 5 iterations after 2 warm-up ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import canonical_flops, common
from easyppo.configs.common import DEMO_DATA
from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.data.batcher import ExampleBatcher
from easyppo.data.examples import ExampleSettings
from easyppo.models import llama
from easyppo.run import config as run_config
from easyppo.run import loop
from easyppo.weights import huggingface

FIRST_ID = 4  # random ids are drawn from [4, vocab), as in every peer script
VERSION_PACKAGES = ("easyppo", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=["dpo", "rm", "ppo"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (variant)")
    p.add_argument("--reference", default="on_the_fly", choices=["on_the_fly", "precomputed"], help="dpo only")
    p.add_argument(
        "--loss-window-buckets", type=int, default=4, help="data.loss_window_buckets (1: LM head over every position)"
    )
    p.add_argument("--fuse-projections", type=int, default=0, choices=[0, 1], help="model.fuse_projections")
    p.add_argument(
        "--old-logprobs", default="recompute", choices=["recompute", "sampler"], help="ppo only: ppo.old_logprobs"
    )
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--batch-pairs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=None, help="default: 128 (dpo, rm) or 64 (ppo)")
    p.add_argument("--response-len", type=int, default=None, help="default: 128 (dpo, rm) or 64 (ppo)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 3 (dpo, rm) or 2 (ppo)")
    p.add_argument("--measure-steps", type=int, default=None, help="default: 10 (dpo, rm) or 5 (ppo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    step_workload = args.workload != "ppo"
    for name, pair in (("prompt_len", (128, 64)), ("response_len", (128, 64)), ("warmup_steps", (3, 2))):
        if getattr(args, name) is None:
            setattr(args, name, pair[0] if step_workload else pair[1])
    if args.measure_steps is None:
        args.measure_steps = 10 if step_workload else 5
    return args


def architecture(args: argparse.Namespace) -> llama.LlamaConfig:
    return llama.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        head_dim=args.hidden_size // args.num_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def save_models(args: argparse.Namespace, root: pathlib.Path) -> dict[str, str]:
    """The canonical random models as Hugging Face directories: the policy and a scalar-head model."""
    model = architecture(args)
    out = {}
    for kind, fold in (("causal_lm", 0), ("reward", 1)):
        params = llama.init_params(model, kind, jax.random.fold_in(jax.random.key(args.seed), fold))
        out[kind] = str(root / kind)
        huggingface.save_hf(out[kind], model, params, kind=kind, pad_token_id=0)
    return out


def configure(config, args: argparse.Namespace, models: dict[str, str], root: pathlib.Path, steps: int) -> None:
    """The sections every workload shares: models, optimizer, tokenizer, mesh, lengths."""
    config.seed = args.seed
    config.output_dir = str(root / "run")
    config.model.init_from = models["reward" if args.workload == "rm" else "causal_lm"]
    config.model.dtype = args.dtype
    config.model.fuse_projections = bool(args.fuse_projections)
    optimizers = [config.optim] + ([config.ppo.value_optim] if args.workload == "ppo" else [])
    for optim in optimizers:
        optim.learning_rate, optim.schedule = 1e-6, "constant"
        optim.b1, optim.b2, optim.eps, optim.weight_decay = 0.9, 0.999, 1e-8, 0.0
        optim.clip_grad_norm = 0.0 if args.workload == "ppo" else 1.0
    config.data.tokenizer_path = str(DEMO_DATA / "tokenizer.model")  # ids only: nothing is decoded
    config.data.pad_id = 0
    config.data.cache_dir = str(root / "cache")
    config.data.max_prompt_len = args.prompt_len
    config.data.max_seq_len = args.prompt_len + args.response_len + (1 if args.workload == "ppo" else 0)
    config.data.loss_window_buckets = args.loss_window_buckets
    config.train.num_steps = steps
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1


def pair_dataset(args: argparse.Namespace, rows: int, config) -> pipeline.PreparedData:
    """``rows`` random preference pairs, already tokenised, behind easyppo's own batcher."""
    import datasets

    rng = np.random.default_rng(args.seed + 1234)
    ids = lambda n: rng.integers(FIRST_ID, args.vocab_size, (rows, n), dtype=np.int32).tolist()
    table = datasets.Dataset.from_dict(
        {
            "prompt_ids": ids(args.prompt_len),
            "chosen_ids": ids(args.response_len),
            "rejected_ids": ids(args.response_len),
            "margin": [0.0] * rows,
        }
    )
    settings = ExampleSettings(
        kind="preference", chat_format="tulu", max_seq_len=config.data.max_seq_len, max_prompt_len=args.prompt_len
    )
    stats = pipeline.DataStats(rows, 0, {}, 0, 0, rows, False)
    return pipeline.PreparedData(
        ExampleBatcher(table, settings, pad_id=0, loss_window_buckets=args.loss_window_buckets),
        f"canonical-{args.seed}-{rows}",
        stats,
        settings,
    )


def run_steps(args: argparse.Namespace, models: dict[str, str], root: pathlib.Path) -> dict[str, Any]:
    steps = args.warmup_steps + args.measure_steps
    config = run_config.base_config(args.workload)
    configure(config, args, models, root, steps)
    config.data.kind = "preference"
    config.data.global_batch_size = args.batch_pairs
    if args.workload == "dpo":
        config.dpo.loss, config.dpo.beta, config.dpo.reference = "sigmoid", 0.1, args.reference
    run_config.validate(config, num_devices=jax.device_count())
    data = pair_dataset(args, steps * args.batch_pairs, config)
    start = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh)
    trainer = loop.trainer_for(config, mesh, steps, train_data=data)  # dpo precomputed: the one-off pass
    state = jax.block_until_ready(trainer.init_state())
    build_s = time.perf_counter() - start
    batches = list(itertools.islice(pipeline.make_iterator(data, config.data), steps))
    times, losses = [], []
    for step, host_batch in enumerate(batches):
        start = time.perf_counter()
        result = trainer.train_step(
            state, sharding.host_local_to_global(host_batch, mesh), jax.random.key(step), step=step
        )
        state, metrics = jax.block_until_ready((result.state, result.metrics))
        times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
    measured = summarize(times[args.warmup_steps :])
    tokens = 2 * args.batch_pairs * (args.prompt_len + args.response_len)
    variant = [
        v
        for v, on in (
            ("precomputed reference", args.reference != "on_the_fly"),
            ("bf16 compute", args.dtype != "float32"),
            ("LM head over every position", args.loss_window_buckets == 1),
        )
        if on
    ]
    return {
        "variant": ", ".join(variant) or "canonical",
        "step_time_median_s": measured["median_s"],
        "tokens_per_s": tokens / measured["median_s"],
        "step_times": measured,
        "warmup_step_times_s": [round(t, 4) for t in times[: args.warmup_steps]],
        "tokens_per_step": tokens,
        "build_s": round(build_s, 3),
        "losses": losses,
        "last_metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
    }


def run_ppo(args: argparse.Namespace, models: dict[str, str], root: pathlib.Path) -> dict[str, Any]:
    iterations = args.warmup_steps + args.measure_steps
    config = run_config.base_config("ppo")
    configure(config, args, models, root, iterations)
    config.data.kind = "prompt"
    config.data.global_batch_size = args.num_prompts
    config.ppo.reward_model.init_from = models["reward"]
    config.ppo.reward_model.dtype = config.ppo.value_model.dtype = args.dtype
    o = config.ppo
    o.samples_per_prompt, o.sampling.max_new_tokens, o.sampling.temperature = 1, args.response_len, 1.0
    o.sampling.stop_at_eos, o.kl_coef, o.kl_estimator = False, 0.05, "k1"
    o.gamma, o.lam, o.ppo_epochs, o.num_minibatches = 1.0, 0.95, 1, 1
    o.clip_ratio, o.value_clip, o.vf_coef, o.entropy_coef = 0.2, 0.2, 0.1, 0.0
    o.old_logprobs = args.old_logprobs
    run_config.validate(config, num_devices=jax.device_count())
    start = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh)
    trainer = loop.trainer_for(config, mesh, iterations)
    trainer.sampling = dataclasses.replace(trainer.sampling, stop_at_eos=False, stop_token_ids=())  # every token
    state = jax.block_until_ready(trainer.init_state())
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(args.seed + 1234)
    shape = (args.num_prompts, args.prompt_len)
    phases: dict[str, list[float]] = {"iter": [], "gen": [], "score": [], "update": []}
    with jax.set_mesh(mesh):
        for i in range(iterations):
            key = jax.random.key(i)
            started = time.perf_counter()
            prompts = {
                "prompt_input_ids": rng.integers(FIRST_ID, args.vocab_size, shape, dtype=np.int32),
                "prompt_attention_mask": np.ones(shape, np.int32),
                "prompt_position_ids": np.broadcast_to(np.arange(args.prompt_len, dtype=np.int32), shape).copy(),
                "example_mask": np.ones(args.num_prompts, np.int32),
                "example_index": np.arange(args.num_prompts, dtype=np.int32),
            }
            batch = sharding.host_local_to_global(prompts, mesh)
            t_gen = time.perf_counter()
            sampled = jax.block_until_ready(
                trainer.rollout(
                    state.params, batch, jax.random.fold_in(key, 0), sampling=trainer.sampling, samples_per_prompt=1
                )
            )
            t_score = time.perf_counter()
            zeros = jnp.zeros(sampled.row_mask.shape, jnp.float32)
            scored = jax.block_until_ready(
                trainer.score(
                    state.params,
                    state.value_params,
                    state.kl_coef,
                    trainer.frozen,
                    sampled,
                    zeros,
                    recompute_policy=args.old_logprobs == "recompute",
                )
            )
            t_update = time.perf_counter()
            state, metrics = jax.block_until_ready(
                trainer.update(state, scored.experience, scored.metrics["kl_per_sequence"], jax.random.fold_in(key, 1))
            )
            end = time.perf_counter()
            for name, seconds in (
                ("iter", end - started),
                ("gen", t_score - t_gen),
                ("score", t_update - t_score),
                ("update", end - t_update),
            ):
                phases[name].append(seconds)
            if int(jnp.sum(sampled.response_mask)) != args.num_prompts * args.response_len:
                raise RuntimeError("a row stopped early: the workload must generate every token")
    s = {name: summarize(values[args.warmup_steps :]) for name, values in phases.items()}
    return {
        "variant": ", ".join(
            v
            for v, on in (
                ("bf16 compute", args.dtype != "float32"),
                ("sampler log-probs", args.old_logprobs == "sampler"),
            )
            if on
        )
        or "canonical",
        "iter_time_median_s": s["iter"]["median_s"],
        "gen_time_median_s": s["gen"]["median_s"],
        "score_time_median_s": s["score"]["median_s"],
        "update_time_median_s": s["update"]["median_s"],
        "gen_tokens_per_s": args.num_prompts * args.response_len / s["gen"]["median_s"],
        "iter_tokens_per_s": args.num_prompts * (args.prompt_len + args.response_len) / s["iter"]["median_s"],
        "iter_times": s["iter"],
        "gen_times": s["gen"],
        "score_times": s["score"],
        "update_times": s["update"],
        "warmup_iter_times_s": [round(t, 4) for t in phases["iter"][: args.warmup_steps]],
        "build_s": round(build_s, 3),
        "last_metrics": {k: float(v) for k, v in jax.device_get({**scored.metrics, **metrics}).items()},
    }


def utilisation(args: argparse.Namespace, measured: dict[str, Any]) -> dict[str, Any]:
    """Model FLOPs per step (canonical_flops) and MFU against the matmul peak measured now, in this process."""
    peak = common.matmul_peak("bfloat16" if args.dtype == "bfloat16" else "float32")
    config = architecture(args)
    if args.workload == "ppo":
        flops = canonical_flops.ppo_iteration(config, args)
        phases = {"iter": "total", "gen": "generation", "score": "scoring", "update": "update"}
        mfu = {part: flops[part] / measured[f"{phase}_time_median_s"] / peak for phase, part in phases.items()}
        return {"model_flops": flops, "matmul_peak_flops": peak, "mfu": mfu["total"], "mfu_by_phase": mfu}
    flops = (canonical_flops.dpo_step if args.workload == "dpo" else canonical_flops.rm_step)(config, args)
    return {"model_flops": flops, "matmul_peak_flops": peak, "mfu": flops / measured["step_time_median_s"] / peak}


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """The harness's timing fields (``_jax_common.summarize``: with the mean, the count and every sample)."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "mean_s": statistics.fmean(times),
        "n": len(times),
        "all_s": [round(t, 6) for t in times],
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        models = save_models(args, root)
        measured = run_ppo(args, models, root) if args.workload == "ppo" else run_steps(args, models, root)
    measured.update(utilisation(args, measured))
    result = {
        "library": "easyppo",
        "workload": args.workload,
        "tag": args.tag,
        **measured,
        "peak_rss_mib": round(common.process_max_rss_bytes() / 2**20, 1),
        "config": dict(vars(args)),
        "script": "benchmarks/canonical.py",
        "load_average": common.load_average(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": versions(),
        "machine": common.machine_info(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
