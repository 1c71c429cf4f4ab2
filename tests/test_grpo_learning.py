"""GRPO learns the demo's verifiable task: from the demo's SFT policy, held-out accuracy rises clearly."""

import pytest

from easyppo.configs import grpo as grpo_presets
from easyppo.configs import sft as sft_presets
from easyppo.run import loop


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_on_the_counting_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo presets write below runs/demo in the working directory
    loop.train(sft_presets.get_config("demo"))
    config = grpo_presets.get_config("demo")
    config.eval.at_start = True
    result = loop.train(config)
    before, after = result.initial_eval_metrics["accuracy"], result.eval_metrics["accuracy"]
    # 128 held-out prompts: measured 0.074 -> 0.373; a rise of 0.15 is several standard errors.
    assert after > before + 0.15, (before, after)
