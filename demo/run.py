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
import logging
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
    logging.basicConfig(level=logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # tokenising a few KB needs no progress bars
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
        results[stage] = (train(config), time.time() - start)

    print("\n=== demo summary ===")
    for stage, (result, seconds) in results.items():
        print(f"{stage:>4}: {result.step} steps, {seconds:.0f} s")
        for key, meaning in HEADLINE[stage]:
            before = result.initial_eval_metrics.get(key, float("nan"))
            after = result.eval_metrics.get(key, float("nan"))
            print(f"      {meaning}: {round(before, 3) + 0.0:.3f} -> {round(after, 3) + 0.0:.3f}")  # no "-0.000"
        print(f"      checkpoints: {result.checkpoint_dir}")
        print(f"      Hugging Face export: {result.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
