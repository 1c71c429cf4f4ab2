"""One GRPO iteration split into rollout, reward, scoring and update, beside a PPO iteration on the
same prompts, in one process.

    python benchmarks/grpo_iteration.py [--hidden 256] [--layers 4] [--prompts 8] [--samples 4]
                                        [--new-tokens 64] [--repeats 3] [--json_out PATH]

Both run the library's own trainers (``loop.trainer_for``) on random LLaMA models with the demo's
tokenizer (its 512-token vocabulary: the reward phase decodes real text) and the bundled counting
prompts. GRPO samples ``--samples`` responses per prompt, rewards them on the host with the demo's
verifiable reward (decode + check), scores them (policy log-probs; no reference, no critic) and
takes one update; PPO samples the same number of rows from the same prompts, scores them with a
reward model, a reference and a critic, and updates policy and critic. Every sample runs to
``--new-tokens`` (stop tokens off), so both iterations do the same generation work.

* **rollout**: ``trainer.rollout`` (prefill + decode loop);
* **reward** (GRPO): the responses fetched, decoded and checked on the host;
* **scoring**: ``trainer.judge`` + ``trainer.assemble`` (GRPO) / ``trainer.score`` (PPO);
* **update**: ``trainer.update``.

tokens/s counts prompt + response tokens of every row per iteration second. Medians of
``--repeats`` iterations after one warm-up (compilation) iteration; prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp

from benchmarks import common
from easyppo.algorithms.rl.host_rewards import HostRows, host_scores
from easyppo.configs.common import DEMO_DATA
from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.run import config as run_config
from easyppo.run import loop


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (both algorithms)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json_out", default=None)
    return parser.parse_args(argv)


def build_config(algorithm: str, args: argparse.Namespace, out: pathlib.Path):
    c = run_config.base_config(algorithm)
    c.output_dir = str(out / algorithm)
    models = [c.model] + ([c.ppo.reward_model] if algorithm == "ppo" else [])
    for model in models:
        model.preset = "tiny"
        model.vocab_size, model.pad_token_id, model.max_position_embeddings = 512, 3, 512
        model.hidden_size, model.intermediate_size = args.hidden, int(args.hidden * 8 / 3) // 8 * 8
        model.num_hidden_layers, model.num_attention_heads, model.num_key_value_heads = args.layers, 4, 4
    c.data.kind = "prompt"
    c.data.path = str(DEMO_DATA / "counting_train.jsonl")
    c.data.tokenizer_path = str(DEMO_DATA / "tokenizer.model")
    c.data.pad_id = 3
    c.data.chat_format = "tulu"
    c.data.max_prompt_len = 40
    c.data.global_batch_size = args.prompts
    c.data.num_proc = 1
    c.data.cache_dir = str(out / "cache")
    c.train.num_steps = 10
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    section = c[algorithm]
    section.samples_per_prompt = args.samples
    section.sampling.max_new_tokens = args.new_tokens
    section.sampling.temperature = 1.0
    section.sampling.stop_at_eos = False
    if algorithm == "grpo":
        section.rewards = "easyppo.configs.demo_rewards:nice_word_count"
    return c


def _phase(times: dict[str, float], name: str, fn):
    """Runs ``fn`` to completion (device work included) and records its seconds under ``name``."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times[name] = time.perf_counter() - start
    return out


def _rollout(trainer, state, batch, rng):
    samples = trainer.options.samples_per_prompt
    return trainer.rollout(state.params, batch, rng, sampling=trainer.sampling, samples_per_prompt=samples)


def time_grpo(trainer, state, batch, rng) -> tuple[dict[str, float], Any]:
    """Times each phase of one iteration; returns the times and the updated state (the old one is donated)."""
    times: dict[str, float] = {}
    with jax.set_mesh(trainer.mesh):
        sampled = _phase(times, "rollout", lambda: _rollout(trainer, state, batch, rng))

        def reward():
            rows = HostRows(sampled, batch["example_index"], trainer.options.samples_per_prompt)
            answers = trainer.train_batcher.answers
            rewards, _ = host_scores(trainer.sources, rows, tokenizer=trainer.tokenizer, answers_of=answers)
            return sharding.global_rows(rewards, trainer.mesh)

        rewards = _phase(times, "reward", reward)
        judge = lambda: trainer.judge(state.params, state.value_params, trainer.frozen, sampled)
        scored = _phase(times, "scoring", lambda: trainer.assemble(judge(), sampled, rewards, state.kl_coef))
        update = lambda: trainer.update(state, scored.experience, jnp.zeros(()), jax.random.fold_in(rng, 1))
        state, _ = _phase(times, "update", update)
    return times, state


def time_ppo(trainer, state, batch, rng) -> tuple[dict[str, float], Any]:
    """Times each phase of one iteration; returns the times and the updated state (the old one is donated)."""
    times: dict[str, float] = {}
    with jax.set_mesh(trainer.mesh):
        sampled = _phase(times, "rollout", lambda: _rollout(trainer, state, batch, rng))
        zeros = jnp.zeros(sampled.row_mask.shape, jnp.float32)
        score = lambda: trainer.score(state.params, state.value_params, state.kl_coef, trainer.frozen, sampled, zeros)
        scored = _phase(times, "scoring", score)
        kl = scored.metrics["kl_per_sequence"]
        state, _ = _phase(
            times, "update", lambda: trainer.update(state, scored.experience, kl, jax.random.fold_in(rng, 1))
        )
    return times, state


def measure(algorithm: str, args: argparse.Namespace, out: pathlib.Path) -> dict[str, Any]:
    config = build_config(algorithm, args, out)
    run_config.validate(config, num_devices=jax.device_count())
    mesh = sharding.make_mesh(config.mesh)
    tokenizer, chat_format = pipeline.load_tokenizer_and_format(config.data)
    data = pipeline.prepare_data(config.data, tokenizer=tokenizer, chat_format=chat_format)
    trainer = loop.trainer_for(config, mesh, 10, train_data=data)
    # The chat format's end-of-turn ids too: every row generates every token, in both algorithms.
    trainer.sampling = dataclasses.replace(trainer.sampling, stop_at_eos=False, stop_token_ids=())
    batch = sharding.host_local_to_global(next(pipeline.make_iterator(data, config.data)), mesh)
    timer = time_grpo if algorithm == "grpo" else time_ppo
    _, state = timer(trainer, trainer.init_state(), batch, jax.random.key(0))  # compiles every program
    runs = []
    for i in range(args.repeats):
        times, state = timer(trainer, state, batch, jax.random.key(1 + i))
        runs.append(times)
    phases = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    iteration = statistics.median(sum(run.values()) for run in runs)
    rows = args.prompts * args.samples
    tokens = rows * (config.data.max_prompt_len + args.new_tokens)
    return {"algorithm": algorithm, "phases_s": phases, "iteration_s": iteration, "tokens_per_s": tokens / iteration}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(name, args, pathlib.Path(tmp)) for name in ("grpo", "ppo")]
    grpo, ppo = results
    report = {
        "benchmark": "grpo_iteration",
        "workload": f"{args.prompts} prompts x {args.samples} samples x (40 + {args.new_tokens}) tokens",
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": 512},
        "machine": common.machine_info(),
        "runs": results,
        "grpo_vs_ppo_tokens_per_s": grpo["tokens_per_s"] / ppo["tokens_per_s"],
    }
    columns = (
        common.Column("algorithm", lambda r: r["algorithm"]),
        *(
            common.Column(
                f"{phase} ms", lambda r, p=phase: f"{1e3 * r['phases_s'][p]:.0f}" if p in r["phases_s"] else "-"
            )
            for phase in ("rollout", "reward", "scoring", "update")
        ),
        common.Column("iteration ms", lambda r: f"{1e3 * r['iteration_s']:.0f}"),
        common.Column("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}"),
    )
    table = (
        common.format_table(results, columns)
        + f"\nGRPO / PPO tokens per second: {report['grpo_vs_ppo_tokens_per_s']:.2f}"
    )
    common.emit(
        report,
        f"GRPO vs PPO iteration ({report['workload']}, hidden {args.hidden}, {args.layers} layers)\n" + table,
        json_out=args.json_out,
    )
    return report


if __name__ == "__main__":
    main()
