"""Specification of the one train loop: resume, preemption, non-finite steps, config errors, sharding,
and that SFT and the reward model learn the demo task."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.demo_data import DEMO_DATA
from helpers.runs import small_demo_data, tiny_config

from easyppo.algorithms import base, sft
from easyppo.cli import train as train_cli
from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.models import llama
from easyppo.run import config as run_config
from easyppo.run import loop
from easyppo.weights import huggingface, run_checkpoint, run_directory

REPO = pathlib.Path(__file__).resolve().parent.parent


small_data = pytest.fixture(scope="module", name="small_data")(small_demo_data)


def final_params(run_dir: pathlib.Path, config):
    model_config = llama.get_preset("tiny", pad_token_id=3)
    kind = "causal_lm" if config.algorithm == "sft" else "reward"
    abstract = jax.eval_shape(lambda: llama.init_params(model_config, kind, jax.random.key(0)))
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        abstract,
    )
    return run_directory.restore_subtree(run_dir / "checkpoints", {"params": target})["params"]


def metrics_lines(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["sft", "rm"])
def test_an_interrupted_and_resumed_run_ends_with_bitwise_identical_parameters(tmp_path, small_data, algorithm):
    whole = tiny_config(algorithm, tmp_path / "whole", small_data)
    assert loop.train(whole).status == "completed"

    split = tiny_config(algorithm, tmp_path / "split", small_data, stop_at_step=3)  # mid-epoch
    first = loop.train(split)
    assert (first.status, first.step) == ("stopped", 3)
    with split.unlocked():
        split.train.stop_at_step = 0
    second = loop.train(split)
    assert (second.status, second.step) == ("completed", 7)  # crossed into the second epoch

    jax.tree.map(
        np.testing.assert_array_equal, final_params(tmp_path / "whole", whole), final_params(tmp_path / "split", split)
    )
    whole_losses = {m["step"]: m["loss"] for m in metrics_lines(tmp_path / "whole") if "loss" in m}
    split_losses = {m["step"]: m["loss"] for m in metrics_lines(tmp_path / "split") if "loss" in m}
    assert whole_losses == split_losses


def test_a_resumed_run_does_not_read_the_initial_weights_again(tmp_path, small_data):
    """The checkpoint replaces them anyway; for a 70B model that read is minutes of wasted I/O."""
    start = tmp_path / "start"
    model_config = llama.get_preset("tiny", pad_token_id=3)
    huggingface.save_hf(str(start), model_config, llama.init_params(model_config, "causal_lm", jax.random.key(3)))
    config = tiny_config("sft", tmp_path / "run", small_data, num_steps=4, stop_at_step=2)
    config.model.init_from = str(start)
    assert loop.train(config).status == "stopped"
    for weights in start.glob("*.safetensors"):
        weights.unlink()  # config.json stays: the architecture is still read from it
    with config.unlocked():
        config.train.stop_at_step = 0
    result = loop.train(config)
    assert (result.status, result.step) == ("completed", 4)


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, small_data):
    config_file = tmp_path / "long_run.py"
    config_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_train import tiny_config\n"
        "import pathlib\n"
        "def get_config(arg=None):\n"
        f"    return tiny_config('sft', pathlib.Path({str(tmp_path / 'run')!r}), {small_data!r}, num_steps=100000)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "easyppo.train", f"--config={config_file}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics_file = tmp_path / "run" / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "preempted" in output
    saved = run_checkpoint.Checkpointer(_checkpoint_cfg(tmp_path / "run" / "checkpoints"), read_only=True).latest_step()
    logged = max(m["step"] for m in metrics_lines(tmp_path / "run"))
    assert saved is not None and saved >= logged >= 2


def _checkpoint_cfg(directory):
    cfg = run_checkpoint.default_config()
    cfg.directory = str(directory)
    return cfg


def _poisoned(make_loss_fn):
    """A loss that is NaN whenever the batch carries a true ``poison`` flag."""

    def make(module, model_config):
        loss_fn = make_loss_fn(module, model_config)

        def poisoned(params, frozen, batch, rng):
            batch = dict(batch)
            poison = batch.pop("poison", jnp.zeros((1,), bool)).any()
            loss, metrics = loss_fn(params, frozen, batch, rng)
            factor = jnp.where(poison, jnp.nan, 1.0)
            return loss * factor, {**metrics, "loss": (metrics["loss"][0] * factor, metrics["loss"][1])}

        return poisoned

    return make


def _sft_batch(config, mesh, poison: bool):
    data = pipeline.prepare_data(config.data)
    host = next(pipeline.make_iterator(data, config.data))
    host["poison"] = np.full((host["input_ids"].shape[0],), poison)
    return sharding.host_local_to_global(host, mesh)


def test_a_non_finite_step_leaves_parameters_and_optimizer_state_untouched(tmp_path, small_data):
    config = run_config.resolve_paths(tiny_config("sft", tmp_path, small_data))
    config.optim.warmup_steps = None  # a zero warmup learning rate would hide whether the update applied
    mesh = sharding.make_mesh(config.mesh)
    options = sft.SFTOptions()
    trainer = base.make_gradient_trainer(
        config,
        mesh,
        7,
        kind="causal_lm",
        loss_fn_for=_poisoned(lambda module, model_config: sft.make_loss_fn(module, model_config, options)),
        pad_token_id=config.data.pad_id,
    )
    state = trainer.init_state()
    before = jax.device_get(state)
    result = trainer.train_step(state, _sft_batch(config, mesh, poison=True), jax.random.key(0), step=0)
    state = result.state
    assert bool(result.skipped)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), before.opt_state)
    result = trainer.train_step(state, _sft_batch(config, mesh, poison=False), jax.random.key(1), step=1)
    state = result.state
    assert not bool(result.skipped)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params), before.params)
    assert all(jax.tree.leaves(changed))


def test_consecutive_non_finite_steps_stop_the_run_and_nothing_non_finite_is_saved(tmp_path, small_data, monkeypatch):
    always_nan = lambda make: lambda *a: lambda p, f, b, r: _nan(make(*a)(p, f, b, r))
    monkeypatch.setattr(sft, "make_loss_fn", always_nan(sft.make_loss_fn))
    config = tiny_config("sft", tmp_path, small_data, max_consecutive_nonfinite=3)
    with pytest.raises(loop.NonFiniteTrainingError, match="3 consecutive steps"):
        loop.train(config)
    assert run_checkpoint.Checkpointer(_checkpoint_cfg(tmp_path / "checkpoints"), read_only=True).latest_step() is None
    assert metrics_lines(tmp_path)[-1]["nonfinite_steps"] == 3


def _nan(result):
    loss, metrics = result
    return loss * jnp.nan, {**metrics, "loss": (metrics["loss"][0] * jnp.nan, metrics["loss"][1])}


def test_an_unknown_config_key_is_named_with_the_closest_match():
    with pytest.raises(run_config.ConfigError, match=r"optim\.learning_rat.*did you mean 'optim\.learning_rate'"):
        train_cli.config_from_argv(
            ["train", f"--config={REPO}/configs/sft.py:demo", "--config.optim.learning_rat=1e-4"]
        )


def test_a_wrongly_typed_override_names_the_flag():
    with pytest.raises(run_config.ConfigError, match="config.optim.learning_rate"):
        train_cli.config_from_argv(
            ["train", f"--config={REPO}/configs/sft.py:demo", "--config.optim.learning_rate=fast"]
        )


def test_overrides_reach_the_config():
    config = train_cli.config_from_argv(
        ["train", f"--config={REPO}/configs/rm.py:demo", "--config.optim.learning_rate=0.5", "--config.mesh.fsdp=2"]
    )
    assert (config.algorithm, config.optim.learning_rate, config.mesh.fsdp) == ("rm", 0.5, 2)


def test_a_mesh_that_does_not_match_the_devices_fails_before_anything_loads(tmp_path, small_data):
    config = tiny_config("sft", tmp_path, small_data)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 3, 1, 1
    with pytest.raises(run_config.ConfigError, match=r"config\.mesh.*8"):
        run_config.validate(config, num_devices=8)


def test_a_batch_that_does_not_split_over_the_mesh_names_the_key(tmp_path, small_data):
    config = tiny_config("sft", tmp_path, small_data, grad_accum_steps=4)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    with pytest.raises(run_config.ConfigError, match=r"data\.global_batch_size.*grad_accum_steps=4"):
        run_config.validate(config, num_devices=8)


def test_a_reference_pass_batch_that_does_not_split_over_the_mesh_names_the_key(tmp_path, small_data):
    config = tiny_config("dpo", tmp_path, small_data)
    config.dpo.reference_batch_size = 12  # the precomputed reference pass spreads its rows over 8 devices
    with pytest.raises(run_config.ConfigError, match=r"dpo\.reference_batch_size: 12 must be divisible .* = 8"):
        run_config.validate(config, num_devices=8)


def test_the_sharded_step_equals_the_single_device_step(tmp_path, small_data):
    config = run_config.resolve_paths(tiny_config("rm", tmp_path, small_data))
    results = []
    for shape, devices in (((2, 2, 2), jax.devices()), ((1, 1, 1), jax.devices()[:1])):
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
        mesh = sharding.make_mesh(config.mesh, devices=devices)
        trainer = loop.trainer_for(config, mesh, 7)
        state = trainer.init_state()
        data = pipeline.prepare_data(config.data)
        iterator = pipeline.make_iterator(data, config.data)
        for step in range(2):
            batch = sharding.host_local_to_global(next(iterator), mesh)
            result = trainer.train_step(state, batch, jax.random.key(step), step=step)
            state = result.state
        results.append((jax.device_get(state.params), float(result.metrics["loss"])))
    (sharded, sharded_loss), (single, single_loss) = results
    np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), sharded, single)


def test_sft_lowers_held_out_loss_and_exports_a_loadable_model(tmp_path, small_data):
    transformers = pytest.importorskip("transformers")
    config = tiny_config("sft", tmp_path, small_data, num_steps=30, export_hf_dir=str(tmp_path / "hf"))
    config.optim.learning_rate = 3e-3
    config.eval.path = small_data["sft_eval"]
    config.eval.at_start = True
    result = loop.train(config)
    assert result.eval_metrics["loss"] < 0.75 * result.initial_eval_metrics["loss"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.pad_token_id == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 512


@pytest.mark.slow
def test_the_reward_model_learns_the_demo_preference_rule(tmp_path):
    """From random initialisation, >= 90% held-out accuracy on the demo's hidden rule."""
    data = {"preference": str(DEMO_DATA / "preference_train.jsonl"), "cache": str(tmp_path / "cache")}
    config = tiny_config("rm", tmp_path, data, num_steps=150, log_every_steps=50)
    config.data.global_batch_size = 32
    config.optim.learning_rate = 2e-3
    config.eval.path = str(DEMO_DATA / "preference_eval.jsonl")
    result = loop.train(config)
    assert result.eval_metrics["accuracy"] >= 0.9, result.eval_metrics


def test_convert_to_hf_exports_any_step_of_a_finished_run(tmp_path, small_data):
    transformers = pytest.importorskip("transformers")
    from easyppo.cli import convert as convert_cli

    config = tiny_config("sft", tmp_path / "run", small_data, num_steps=4)
    config.checkpoint.save_every_steps = 2
    config.optim.learning_rate = 3e-3
    loop.train(config)
    run_dir = tmp_path / "run"
    assert convert_cli.main(["to-hf", str(run_dir), str(tmp_path / "step2"), "--step", "2"]) == 0
    assert convert_cli.main(["to-hf", str(run_dir / "checkpoints"), str(tmp_path / "last")]) == 0
    _, _, at_step_2 = huggingface.load_hf(str(tmp_path / "step2"))
    _, _, last = huggingface.load_hf(str(tmp_path / "last"))
    stored = final_params(run_dir, config)  # the latest step (4)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(last), jax.device_get(stored))
    assert not np.array_equal(at_step_2["lm_head"]["kernel"], last["lm_head"]["kernel"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "last")  # complete: tokenizer and template
    assert tokenizer.pad_token_id == 3 and tokenizer.chat_template
    assert json.loads((tmp_path / "last" / "generation_config.json").read_text())["eos_token_id"]
    # A run names its own pad id and tokenizer: flags that would be ignored are refused.
    assert convert_cli.main(["to-hf", str(run_dir), str(tmp_path / "x"), "--tokenizer_dir", str(tmp_path)]) == 2
    assert not (tmp_path / "x").exists()
