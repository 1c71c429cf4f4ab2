"""Specification of the shipped presets: every one builds, the recipe presets hold the published
values, and the accelerator presets pass the run's own validation on the slices docs/tpu.md names
(with the named checkpoints' architectures standing in for their weights)."""

import importlib.util
import pathlib

import jax
import pytest

from easyppo.models import llama
from easyppo.run import config as run_config
from easyppo.weights import huggingface, loading

REPO = pathlib.Path(__file__).resolve().parent.parent
ALGORITHMS = ("sft", "rm", "dpo", "ppo", "grpo", "online_dpo")

# The architecture of every checkpoint the presets name (their config.json, as presets).
NAMED_CHECKPOINTS = {
    "meta-llama/Llama-2-7b-hf": "llama2_7b",
    "allenai/tulu-2-13b": "tulu2_13b",
    "allenai/Llama-3.1-Tulu-3-8B-SFT": "llama3.1_8b",
    "allenai/Llama-3.1-Tulu-3-8B-DPO": "llama3.1_8b",
    "allenai/tulu-v2.5-13b-uf-rm": "tulu2_13b",
    "allenai/tulu-v2.5-70b-preference-mix-rm": "tulu2_70b",
}


def config_module(algorithm: str):
    spec = importlib.util.spec_from_file_location(f"configs_{algorithm}", REPO / "configs" / f"{algorithm}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ALL_PRESETS = [(algorithm, preset) for algorithm in ALGORITHMS for preset in config_module(algorithm).PRESETS]
POD_PRESETS = [(algorithm, preset) for algorithm, preset in ALL_PRESETS if preset != "demo"]


@pytest.mark.parametrize("algorithm, preset", ALL_PRESETS)
def test_every_preset_builds_a_config_of_its_algorithm(algorithm, preset):
    config = config_module(algorithm).get_config(preset)
    assert config.algorithm == algorithm
    run_config.check_override_keys(config, [f"{algorithm}"])  # the algorithm's own section is there


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_unknown_preset_is_rejected_naming_the_known_ones(algorithm):
    with pytest.raises(ValueError, match="demo"):
        config_module(algorithm).get_config("no_such_preset")


@pytest.fixture
def named_checkpoints(monkeypatch):
    """Resolve the presets' Hugging Face names to their architectures, as a local copy would."""
    real = loading._stored_architecture

    def stored(cfg):
        if cfg.init_from in NAMED_CHECKPOINTS:
            return llama.get_preset(NAMED_CHECKPOINTS[cfg.init_from])
        return real(cfg)

    monkeypatch.setattr(loading, "_stored_architecture", stored)


@pytest.mark.parametrize("chips, hosts", [(32, 8), (64, 16), (128, 32)])
@pytest.mark.parametrize("algorithm, preset", [p for p in POD_PRESETS if p[0] == "ppo"])
def test_the_ppo_pod_presets_validate_on_32_to_128_chip_slices(named_checkpoints, algorithm, preset, chips, hosts):
    run_config.validate(config_module(algorithm).get_config(preset), num_devices=chips, process_count=hosts)


@pytest.mark.parametrize("algorithm, preset", POD_PRESETS)
def test_every_pod_preset_validates_on_a_32_chip_slice(named_checkpoints, algorithm, preset):
    run_config.validate(config_module(algorithm).get_config(preset), num_devices=32, process_count=8)


def test_the_group_presets_hold_their_recipes_distinguishing_choices():
    grpo = config_module("grpo")
    rlvr, dr, dapo = (grpo.get_config(name).grpo for name in ("tulu3_8b_rlvr", "dr_grpo", "dapo"))
    assert (rlvr.advantage_estimator, rlvr.kl_loss_coef, rlvr.samples_per_prompt) == ("grpo", 0.01, 16)
    assert (dr.advantage_estimator, dr.loss_aggregation, dr.kl_loss_coef) == ("dr_grpo", "seq-mean-token-sum-norm", 0.0)
    assert (dapo.clip_ratio, dapo.clip_ratio_high, dapo.dynamic_sampling, dapo.overlong_buffer) == (
        0.2,
        0.28,
        True,
        4096,
    )


def test_the_tulu25_ppo_preset_holds_the_recipe_values():
    c = config_module("ppo").get_config("tulu25_13b_uf_mean")
    assert c.model.init_from == "allenai/tulu-2-13b"
    assert c.ppo.reward_model.init_from == "allenai/tulu-v2.5-70b-preference-mix-rm"
    assert c.ppo.value_model.init_from == ""  # the value model starts from the reward model
    assert (c.data.hf_dataset, c.data.split) == ("allenai/tulu-2.5-preference-data", "ultrafeedback_mean_aspects")
    assert c.data.global_batch_size == 64 and c.data.num_epochs == 1
    for optim in (c.optim, c.ppo.value_optim):
        assert optim.learning_rate == 1e-6 and optim.schedule == "linear" and optim.warmup_ratio == 0.1
        assert (optim.b1, optim.b2, optim.eps) == (0.9, 0.999, 1e-8)
    assert c.ppo.kl_coef == 0.0325 and not c.ppo.adaptive_kl
    assert (c.ppo.gamma, c.ppo.lam, c.ppo.clip_ratio, c.ppo.value_clip, c.ppo.vf_coef) == (1.0, 0.95, 0.2, 0.2, 0.1)
    assert c.ppo.sampling.temperature == 0.7 and c.ppo.sampling.max_new_tokens == 1024
    assert c.ppo.missing_eos_penalty == -10.0 and c.ppo.missing_eos_mode == "replace"


def test_a_loaded_model_takes_only_overrides_that_change_no_parameter_shape(tmp_path):
    config = llama.get_preset("tiny", pad_token_id=3)
    huggingface.save_hf(str(tmp_path), config, llama.init_params(config, "causal_lm", jax.random.key(0)))
    cfg = loading.default_config()
    cfg.init_from = str(tmp_path)
    cfg.max_position_embeddings = 2 * config.max_position_embeddings  # e.g. Tulu 2's 8192 on Llama 2
    assert loading.resolve_architecture(cfg).max_position_embeddings == 2 * config.max_position_embeddings
    cfg.hidden_size = 2 * config.hidden_size
    with pytest.raises(ValueError, match="model.hidden_size"):
        loading.resolve_architecture(cfg)
