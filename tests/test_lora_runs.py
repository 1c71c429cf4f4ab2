"""LoRA runs through the one train loop: every algorithm, what is trained and stored, the reference
for free, sharding, exact resume, exports, and learning on the demo tasks."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from helpers.demo_data import DEMO_DATA, first_rows
from helpers.grpo_runs import tiny_grpo_config
from helpers.ppo_runs import tiny_ppo_config
from helpers.runs import tiny_config
from safetensors.numpy import load_file

from easyppo.cli import convert as convert_cli
from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.models import lora
from easyppo.run import config as run_config
from easyppo.run import loop
from easyppo.run.export_checkpoint import export_run_checkpoint
from easyppo.weights import loading, peft_adapters, run_directory

SINGLE = {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    return {
        "sft": first_rows(DEMO_DATA / "sft_train.jsonl", root / "sft.jsonl", 40),
        "preference": first_rows(DEMO_DATA / "preference_train.jsonl", root / "pref.jsonl", 256),
        "preference_eval": first_rows(DEMO_DATA / "preference_eval.jsonl", root / "pref_eval.jsonl", 32),
        "cache": str(root / "cache"),
    }


def lora_config(algorithm: str, out: pathlib.Path, data: dict, *, rank: int = 8, **train):
    c = tiny_config(algorithm, out, data, **train)
    c.model.lora.rank = rank
    c.optim.learning_rate = 1e-2  # adapters start at zero and move the model through a low-rank product
    return c


def weights(directory) -> dict:
    return load_file(str(pathlib.Path(directory) / "model.safetensors"))


def stored_params(run_dir) -> set[str]:
    """'/'-joined paths of the stored parameters (the policy's, or the critic's) of a run's last step."""
    leaves = run_directory.stored_leaves(pathlib.Path(run_dir) / "checkpoints")
    return {"/".join(map(str, key[1:])) for key in leaves if key[0] in ("params", "value_params")}


def stored_optimizer_leaves(run_dir) -> set[str]:
    leaves = run_directory.stored_leaves(pathlib.Path(run_dir) / "checkpoints")
    return {"/".join(map(str, key)) for key in leaves if "opt_state" in key[0]}


def initial_base(config, kind: str) -> dict:
    """The base the run started from: the same model config without adapters, at the run's seed."""
    cfg = loading.frozen_config(config.model)
    mesh = sharding.make_mesh(SINGLE, jax.devices()[:1])
    return jax.device_get(loading.load_model(cfg, kind, mesh=mesh, rng=jax.random.key(config.seed))[2])


# ----------------------------------------------------------------------- what a LoRA run trains


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, data):
    """A LoRA SFT run straight through, and the same run stopped half-way and resumed."""
    root = tmp_path_factory.mktemp("sft")
    straight = lora_config("sft", root / "straight", data, num_steps=6)
    straight.train.export_hf_dir = str(root / "straight" / "hf")
    straight.model.lora.export = "both"
    loop.train(straight)
    resumed = lora_config("sft", root / "resumed", data, num_steps=6, stop_at_step=3)
    resumed.train.export_hf_dir = str(root / "resumed" / "hf")
    resumed.checkpoint.save_every_steps = 3
    loop.train(resumed)
    resumed.train.stop_at_step = 0
    loop.train(resumed)
    return {"root": root, "config": straight}


def test_a_lora_run_checkpoints_only_its_adapters_and_their_optimizer_state(sft_runs):
    run = sft_runs["root"] / "straight"
    names = stored_params(run)
    assert names and all(name.endswith(("lora_a", "lora_b")) for name in names), sorted(names)[:5]
    moments = [name for name in stored_optimizer_leaves(run) if name.endswith(("kernel", "embedding", "scale"))]
    assert moments == []  # no Adam moments for any base weight


def test_a_lora_run_changes_only_what_its_adapters_reach(sft_runs):
    trained = weights(sft_runs["root"] / "straight" / "hf")
    start = traverse_util.flatten_dict(initial_base(sft_runs["config"], "causal_lm"))
    np.testing.assert_array_equal(trained["model.embed_tokens.weight"], start[("model", "embed_tokens", "embedding")])
    np.testing.assert_array_equal(trained["model.norm.weight"], start[("model", "norm", "scale")])
    np.testing.assert_array_equal(trained["lm_head.weight"], start[("lm_head", "kernel")].T)
    moved = (
        trained["model.layers.0.self_attn.q_proj.weight"]
        - start[("model", "layers_0", "self_attn", "q_proj", "kernel")].T
    )
    assert np.abs(moved).max() > 1e-4  # an adapted projection moved
    assert np.linalg.matrix_rank(moved, tol=1e-6) <= 8  # the update is the adapter's low-rank product


def test_a_resumed_lora_run_ends_bit_for_bit_where_an_uninterrupted_one_does(sft_runs):
    root = sft_runs["root"]
    straight, resumed = weights(root / "straight" / "hf"), weights(root / "resumed" / "hf")
    assert straight.keys() == resumed.keys()
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)
    losses = [
        [
            row["loss"]
            for row in map(json.loads, (root / run / "logs" / "metrics.jsonl").read_text().splitlines())
            if "loss" in row
        ]
        for run in ("straight", "resumed")
    ]
    assert losses[0] == losses[1]


def test_a_lora_run_exports_merged_weights_and_a_peft_adapter_and_converts_later(sft_runs, tmp_path):
    root = sft_runs["root"] / "straight"
    adapter = root / "hf_adapter"
    config = json.loads((adapter / peft_adapters.ADAPTER_CONFIG_FILE).read_text())
    assert (config["peft_type"], config["r"], config["task_type"]) == ("LORA", 8, "CAUSAL_LM")
    assert sorted(config["target_modules"]) == sorted(lora.PROJECTIONS)
    # The base is read again and the adapters folded in, on the run's own mesh: the same numbers.
    export_run_checkpoint(str(root), str(tmp_path / "later"), mesh=sharding.make_mesh(sft_runs["config"].mesh))
    later, own = weights(tmp_path / "later"), weights(root / "hf")
    for name in own:
        np.testing.assert_array_equal(later[name], own[name], err_msg=name)


def test_convert_writes_any_step_of_a_lora_run_as_a_peft_adapter(sft_runs, tmp_path):
    root = sft_runs["root"] / "straight"
    assert convert_cli.main(["to-hf", str(root), str(tmp_path / "adapter"), "--peft"]) == 0
    ours, run_own = (
        load_file(str(d / peft_adapters.ADAPTER_WEIGHTS_FILE)) for d in (tmp_path / "adapter", root / "hf_adapter")
    )
    assert ours.keys() == run_own.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], run_own[name], err_msg=name)
    assert convert_cli.main(["to-hf", str(sft_runs["root"] / "missing"), str(tmp_path / "x"), "--peft"]) == 2


def test_a_lora_run_directory_starts_another_run_as_its_merged_model(sft_runs):
    cfg = loading.default_config()
    cfg.init_from = str(sft_runs["root"] / "straight" / "checkpoints")
    mesh = sharding.make_mesh(SINGLE, jax.devices()[:1])
    _, _, params = loading.load_model(cfg, "causal_lm", mesh=mesh, rng=jax.random.key(0))
    own = weights(sft_runs["root"] / "straight" / "hf")
    np.testing.assert_array_equal(
        jax.device_get(params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]).T,
        own["model.layers.1.mlp.down_proj.weight"],
    )


def test_a_lora_reward_model_trains_its_score_head_in_full(tmp_path, data):
    config = lora_config("rm", tmp_path / "rm", data, num_steps=3)
    config.train.export_hf_dir = str(tmp_path / "rm" / "hf")
    loop.train(config)
    names = stored_params(tmp_path / "rm")
    assert "score/kernel" in names and all(n == "score/kernel" or n.endswith(("lora_a", "lora_b")) for n in names)
    start = traverse_util.flatten_dict(initial_base(config, "reward"))
    trained = weights(tmp_path / "rm" / "hf")
    assert np.abs(trained["score.weight"] - start[("score", "kernel")].T).max() > 1e-4
    np.testing.assert_array_equal(trained["model.embed_tokens.weight"], start[("model", "embed_tokens", "embedding")])


# ------------------------------------------------------------------------- sharding and the reference


def test_a_sharded_lora_step_equals_the_single_device_step(tmp_path, data):
    config = lora_config("dpo", tmp_path / "dpo", data)
    config.data.path, config.data.global_batch_size = data["preference"], 16
    config.dpo.reference = "on_the_fly"  # the reference (the base) sharded like the policy
    results = []
    for shape, devices in (((2, 2, 2), jax.devices()), ((1, 1, 1), jax.devices()[:1])):
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
        mesh = sharding.make_mesh(config.mesh, devices=devices)
        prepared = pipeline.prepare_data(config.data)
        trainer = loop.trainer_for(config, mesh, 6, train_data=prepared)
        batch = sharding.host_local_to_global(next(pipeline.make_iterator(prepared, config.data)), mesh)
        state = trainer.init_state()
        for step in range(2):  # the second step starts from adapters that are no longer zero
            result = trainer.train_step(state, batch, jax.random.key(step), step=step)
            state = result.state
        results.append((jax.device_get(state.params), jax.device_get(result.metrics)))
    (sharded, sharded_metrics), (single, single_metrics) = results
    # Accuracy counts ties, and the step's policy is still its reference (the first step's learning
    # rate is 0 in warmup): a last-bit difference decides a tie, so only the continuous metrics compare.
    for name in set(single_metrics) - {"accuracy"}:
        np.testing.assert_allclose(sharded_metrics[name], single_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), sharded, single)


def _count_loads(monkeypatch) -> list[str]:
    """The kinds of every model loaded from now on, wherever a module calls ``load_model`` from."""
    kinds = []
    original = loading.load_model

    def counted(cfg, kind, **kwargs):
        kinds.append(kind)
        return original(cfg, kind, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("easyppo.") and getattr(module, "load_model", None) is original:
            monkeypatch.setattr(module, "load_model", counted)
    return kinds


def test_lora_dpo_uses_the_policys_own_base_as_its_reference(tmp_path, data, monkeypatch):
    kinds = _count_loads(monkeypatch)
    config = lora_config("dpo", tmp_path / "dpo", data)
    config.data.path = data["preference"]
    config.dpo.reference = "on_the_fly"
    mesh = sharding.make_mesh(SINGLE, jax.devices()[:1])
    trainer = loop.trainer_for(config, mesh, 6, train_data=pipeline.prepare_data(config.data))
    assert kinds == ["causal_lm"]  # the policy, and no second model for the reference
    reference, base_params = jax.tree.leaves(trainer.frozen["reference_params"]), jax.tree.leaves(trainer.base_params)
    assert len(reference) == len(base_params) and all(r is b for r, b in zip(reference, base_params))  # same arrays


# ------------------------------------------------------------------------------- every algorithm


def rl_config(algorithm: str, out: pathlib.Path):
    """The tests' tiny runs of each RL algorithm, each with a frozen reference in use."""
    if algorithm == "grpo":
        config = tiny_grpo_config(out)
        config.grpo.kl_loss_coef = 0.04
        config.data.global_batch_size = 8  # one prompt per device
        return config, config.grpo
    ppo = tiny_ppo_config(out)
    if algorithm == "ppo":
        return ppo, ppo.ppo
    config = run_config.base_config("online_dpo")
    for section in ("model", "data", "train", "checkpoint", "logging", "optim"):
        config[section] = ppo[section]
    config.output_dir = ppo.output_dir
    config.online_dpo.reward_model = ppo.ppo.reward_model
    config.online_dpo.sampling.max_new_tokens = 8
    return config, config.online_dpo


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "online_dpo"])
def test_every_rl_algorithm_trains_lora_adapters_with_the_base_as_reference(tmp_path, algorithm, monkeypatch):
    config, section = rl_config(algorithm, tmp_path / algorithm)
    config.model.lora.rank = 4
    if algorithm == "ppo":
        section.value_model.lora.rank = 4  # the critic too
    config.train.export_hf_dir = str(tmp_path / algorithm / "hf")
    config.model.lora.export = "peft"
    kinds = _count_loads(monkeypatch)
    result = loop.train(config)
    assert result.status == "completed"
    assert kinds.count("causal_lm") == 1, kinds  # no reference loaded beside the policy
    names = stored_params(tmp_path / algorithm)  # the policy's adapters (and the critic's, with its head)
    assert all(name.endswith(("lora_a", "lora_b")) or name == "score/kernel" for name in names), sorted(names)
    assert ("score/kernel" in names) == (algorithm == "ppo")
    assert (tmp_path / algorithm / "hf" / peft_adapters.ADAPTER_WEIGHTS_FILE).exists()
    if algorithm == "ppo":
        value = tmp_path / algorithm / "hf_value"
        assert json.loads((value / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


# ------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_lora_dpo_learns_the_demo_preference(tmp_path, data):
    config = lora_config("dpo", tmp_path / "dpo", data, num_steps=40)
    config.data.path, config.eval.path = data["preference"], data["preference_eval"]
    config.data.global_batch_size = 16
    config.dpo.reference = "precomputed"  # the base's log-probs, cached as a full run's would be
    config.eval.at_start = True
    result = loop.train(config)
    start = result.initial_eval_metrics  # the adapted policy starts at its reference: no margin
    assert abs(start["reward_margin"]) < 1e-4 and start["loss"] == pytest.approx(np.log(2), abs=1e-4), start
    # Measured 30 of 32 held-out pairs right, on one device and on eight.
    assert result.eval_metrics["accuracy"] >= 0.85, result.eval_metrics
