"""Specification of a PPO run in the train loop: exact resume, HF export of policy and value, the
samples table and held-out evaluation."""

import json

import jax
import numpy as np
import pytest
from helpers.ppo_runs import TINY, metric_rows, tiny_ppo_config, train_rows

from easyppo.core import sharding
from easyppo.models import llama
from easyppo.run import loop
from easyppo.weights import huggingface, loading, run_directory

STEPS = 3


def _config(out, cache_dir):
    config = tiny_ppo_config(out, cache_dir=cache_dir)
    config.train.num_steps = STEPS
    config.ppo.adaptive_kl = True  # the KL controller's state must survive the restart too
    config.ppo.kl_target = 0.5
    config.ppo.kl_horizon = 100
    config.ppo.num_minibatches = 2
    config.ppo.ppo_epochs = 2
    config.logging.samples_every_steps = 1
    config.logging.samples_to_log = 3
    config.checkpoint.save_every_steps = 1
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run twice: straight through (with export and evaluation), and stopped after step 1."""
    root = tmp_path_factory.mktemp("ppo")
    cache = str(root / "cache")
    straight = _config(root / "straight", cache)
    straight.train.export_hf_dir = str(root / "export" / "policy")
    straight.eval.path = straight.data.path
    straight.eval.batch_size = 16
    straight.eval.max_batches = 1
    straight.eval.at_start = True
    straight_result = loop.train(straight)

    interrupted = _config(root / "interrupted", cache)
    interrupted.train.stop_at_step = 1
    first = loop.train(interrupted)
    with interrupted.unlocked():
        interrupted.train.stop_at_step = 0
    resumed = loop.train(interrupted)
    return dict(root=root, straight=straight_result, first=first, resumed=resumed)


def _state(run_dir):
    model_config = llama.get_preset("tiny", **TINY)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(kind):
        shapes = jax.eval_shape(lambda: llama.init_params(model_config, kind, jax.random.key(0)))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)

    scalar = jax.ShapeDtypeStruct((), np.float32, sharding=device)
    tree = {"params": target("causal_lm"), "value_params": target("value"), "kl_coef": scalar}
    return jax.device_get(run_directory.restore_subtree(run_dir / "checkpoints", tree))


def test_a_stopped_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(runs):
    assert runs["first"].status == "stopped" and runs["first"].step == 1
    assert runs["resumed"].status == "completed" and runs["resumed"].step == STEPS
    straight, resumed = _state(runs["root"] / "straight"), _state(runs["root"] / "interrupted")
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    assert float(straight["kl_coef"]) != pytest.approx(0.01)  # the controller did move


def test_a_resumed_run_logs_the_same_rollout_metrics_as_the_uninterrupted_one(runs):
    straight = {row["step"]: row for row in train_rows(runs["root"] / "straight")}
    resumed = {row["step"]: row for row in train_rows(runs["root"] / "interrupted")}
    for step in range(1, STEPS + 1):
        for name in ("score", "kl_per_sequence", "kl_coef", "policy_loss", "value_loss", "response_length"):
            assert resumed[step][name] == straight[step][name], (step, name)


def test_every_training_record_carries_the_ppo_telemetry(runs):
    expected = {
        "score",
        "score_std",
        "kl_per_token",
        "kl_per_sequence",
        "non_score_reward",
        "entropy",
        "policy_clip_fraction",
        "value_clip_fraction",
        "approx_kl",
        "explained_variance",
        "response_length",
        "eos_rate",
        "logprob_gap",
        "kl_coef",
        "learning_rate",
        "tokens_per_second",
    }
    for row in train_rows(runs["root"] / "straight"):
        assert expected <= set(row), expected - set(row)


def test_the_samples_table_holds_decoded_prompts_responses_and_rewards(runs):
    lines = (runs["root"] / "straight" / "logs" / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["step"] for row in rows] == [step for step in range(1, STEPS + 1) for _ in range(3)]
    for row in rows:
        assert row["prompt"].startswith("<s><|") and row["prompt"].endswith("\n<|assistant|>\n")  # Tulu layout
        assert isinstance(row["response"], str) and row["response_tokens"] >= 1
        assert np.isfinite(row["score"]) and np.isfinite(row["kl"])


def test_held_out_evaluation_reports_the_reward_of_the_policys_responses_before_and_after(runs):
    before, after = runs["straight"].initial_eval_metrics, runs["straight"].eval_metrics
    for metrics in (before, after):
        assert {"score", "score_std", "kl_per_sequence", "response_length", "eos_rate"} <= set(metrics)
    assert before["kl_per_sequence"] == pytest.approx(0.0, abs=1e-4)  # the policy starts at the reference
    eval_rows = [row for row in metric_rows(runs["root"] / "straight") if "eval/score" in row]
    assert [row["step"] for row in eval_rows] == [0, STEPS]


def test_export_writes_the_policy_and_the_value_model_as_hugging_face_directories(runs):
    policy_dir = runs["root"] / "export" / "policy"
    value_dir = runs["root"] / "export" / "policy_value"
    assert runs["straight"].export_dir == str(policy_dir)
    state = _state(runs["root"] / "straight")
    for directory, kind, params in (
        (policy_dir, "causal_lm", state["params"]),
        (value_dir, "value", state["value_params"]),
    ):
        assert (directory / "config.json").exists() and (directory / "tokenizer.model").exists()
        _, _, loaded = huggingface.load_hf(str(directory), kind)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)
    assert json.loads((value_dir / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


def test_a_ppo_run_directory_starts_another_run_with_its_policy(runs):
    cfg = loading.default_config()
    cfg.init_from = str(runs["root"] / "straight" / "checkpoints")
    mesh = sharding.make_mesh(sharding.default_config())
    _, _, params = loading.load_model(cfg, "causal_lm", mesh=mesh, rng=jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), _state(runs["root"] / "straight")["params"])
