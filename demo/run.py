"""The demo behind `make demo`: every stage of preference tuning on the bundled task, on a CPU.

    SFT (a starting policy) -> reward model (Bradley-Terry) -> DPO (from the SFT policy)
                                                           -> PPO (SFT policy, reward and value from the RM)
                            -> GRPO (SFT policy, a verifiable reward on the counting task)
    each exported to Hugging Face format

Each stage is an ordinary run of the one train loop with a ``demo`` preset, exactly what
``easyppo train --config=<stage>:demo`` does; outputs go to runs/demo/ below the working directory.
A stage whose export already exists is skipped, so an interrupted demo continues where it stopped
(delete runs/demo to start over).
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import time

STAGES = ("sft", "rm", "dpo", "ppo", "grpo")
# The held-out metrics each stage's summary prints before -> after: (metric, what it means).
HEADLINE = {
    "sft": [("loss", "held-out NLL per assistant token")],
    "rm": [("accuracy", "held-out preference accuracy")],
    "dpo": [
        ("accuracy", "held-out preference accuracy (implicit reward)"),
        ("reward_margin", "held-out implicit-reward margin"),
    ],
    "ppo": [
        ("score", "held-out reward-model score of the policy's responses"),
        ("kl_per_sequence", "held-out KL to the SFT policy (nats per response)"),
    ],
    "grpo": [("accuracy", "held-out accuracy of sampled responses on the counting task")],
}


def load_config(stage: str):
    return importlib.import_module(f"easyppo.configs.{stage}").get_config("demo")


def main() -> int:
    from easyppo.cli import logs

    logs.configure(verbose=False)  # the stages' own progress lines, not their libraries' chatter
    import datasets

    datasets.disable_progress_bars()  # tokenising a few KB needs no progress bars
    from easyppo.run import plots
    from easyppo.run.loop import train

    results = {}
    for stage in STAGES:
        config = load_config(stage)
        if (pathlib.Path(config.train.export_hf_dir) / "config.json").exists():
            print(f"[{stage}] already done: {config.train.export_hf_dir} (delete runs/demo to redo)")
            continue
        print(f"\n=== {stage}: easyppo train --config={stage}:demo ===", flush=True)
        with config.unlocked():
            config.eval.at_start = True
        start = time.time()
        result = train(config)
        results[stage] = (result, time.time() - start, plots.write_plots(config.output_dir))
    completions = ppo_completions() if "ppo" in results else []

    print("\n=== demo summary ===")
    for stage, (result, seconds, pictures) in results.items():
        print(f"{stage:>4}: {result.step} steps, {seconds:.0f} s")
        for key, meaning in HEADLINE[stage]:
            before = result.initial_eval_metrics.get(key, float("nan"))
            after = result.eval_metrics.get(key, float("nan"))
            print(f"      {meaning}: {round(before, 3) + 0.0:.3f} -> {round(after, 3) + 0.0:.3f}")  # no "-0.000"
        stats = result.data_stats
        print(
            f"      data: {stats['rows_used']} of {stats['rows_read']} rows used, "
            f"{stats['rows_truncated']} truncated to fit (data.max_prompt_len / max_seq_len)"
        )
        print(f"      checkpoints: {result.checkpoint_dir}")
        print(f"      Hugging Face export: {result.export_dir}")
        print(f"      training curves: {pathlib.Path(pictures[-1]).parent}/ ({len(pictures)} PNG files)")
    for prompt, before, after in completions:
        print(f"\nheld-out prompt: {prompt}\n  SFT policy: {before}\n  PPO policy: {after}")
    return 0


def ppo_completions(count: int = 3) -> list[tuple[str, str, str]]:
    """A few held-out prompts answered by the SFT policy and by the PPO policy (same sampler, same seed)."""
    import json
    import tempfile

    from easyppo.configs.common import DEMO_DATA, demo_runs
    from easyppo.run.generate import generate_file
    from easyppo.run.generate_options import GenerateOptions

    answers = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = pathlib.Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join((DEMO_DATA / "prompts_eval.jsonl").read_text().splitlines(keepends=True)[:count]))
        for stage in ("sft", "ppo"):
            output = pathlib.Path(tmp) / f"{stage}.jsonl"
            options = GenerateOptions(
                checkpoint=str(demo_runs() / stage / "hf"),
                prompts=str(prompts),
                output=str(output),
                max_new_tokens=32,
                temperature=1.0,
                progress=False,
                cache_dir=str(demo_runs() / "cache"),
                num_proc=1,
            )
            generate_file(options)
            answers[stage] = [json.loads(line) for line in output.read_text().splitlines()]
    user_text = lambda prompt: prompt.split("<|user|>\n", 1)[-1].split("\n<|assistant|>", 1)[0]
    return [
        (user_text(sft["prompt"]), sft["response"], ppo["response"])
        for sft, ppo in zip(answers["sft"], answers["ppo"], strict=True)
    ]


if __name__ == "__main__":
    sys.exit(main())
