"""Specification of the DPO family: every loss against its paper formula written in NumPy, the response
log-probs against a full (unchunked) softmax, the precomputed reference and its cache, sharding, and
that DPO learns the demo's preference rule through the one train loop."""

import json
import logging
import os
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from helpers.demo_data import DEMO_DATA, first_rows

from easyppo.algorithms import dpo, dpo_reference, reference_cache
from easyppo.core import sharding
from easyppo.data import pipeline, windows
from easyppo.models import llama
from easyppo.run import config as run_config
from easyppo.run import loop
from easyppo.weights import huggingface

REPO = pathlib.Path(__file__).resolve().parent.parent
PAD = 3


# ------------------------------------------------------------------------------ NumPy references


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_log_ratio_margin(policy, reference):
    return (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])


def random_logps(seed, pairs=64):
    """Summed log-probs of plausible size, with margins of both signs and both sides of 1/beta."""
    rng = np.random.default_rng(seed)
    return rng.normal(-30.0, 8.0, (pairs, 2)).astype(np.float32), rng.normal(-30.0, 8.0, (pairs, 2)).astype(np.float32)


def settings(**kwargs):
    return dpo.LossSettings(**kwargs)


# ------------------------------------------------------------------------------------ the losses


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_sigmoid_loss_is_conservative_dpo_formula(label_smoothing):
    policy, reference = random_logps(0)
    beta = 0.3
    loss_settings = settings(loss="sigmoid", beta=beta, label_smoothing=label_smoothing)
    losses, _ = dpo.preference_losses(loss_settings, policy, reference)
    z = beta * np_log_ratio_margin(policy.astype(np.float64), reference.astype(np.float64))
    expected = -(1 - label_smoothing) * np_log_sigmoid(z) - label_smoothing * np_log_sigmoid(-z)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)


def test_ipo_loss_is_squared_distance_of_margin_to_half_inverse_beta():
    policy, reference = random_logps(1)
    beta = 0.1
    losses, _ = dpo.preference_losses(settings(loss="ipo", beta=beta), policy, reference)
    h = np_log_ratio_margin(policy.astype(np.float64), reference.astype(np.float64))
    np.testing.assert_allclose(losses, (h - 1 / (2 * beta)) ** 2, rtol=1e-5)


def test_hinge_loss_is_zero_beyond_unit_scaled_margin():
    policy, reference = random_logps(2)
    beta = 0.2
    losses, _ = dpo.preference_losses(settings(loss="hinge", beta=beta), policy, reference)
    h = np_log_ratio_margin(policy.astype(np.float64), reference.astype(np.float64))
    expected = np.maximum(0.0, 1.0 - beta * h)
    assert (expected == 0).any() and (expected > 0).any()  # both regimes are exercised
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_ignores_the_reference_and_subtracts_gamma(label_smoothing):
    mean_logps = np.random.default_rng(3).normal(-2.0, 0.7, (64, 2)).astype(np.float32)
    beta, gamma = 2.0, 1.2
    losses, rewards = dpo.preference_losses(
        settings(loss="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing), mean_logps, None
    )
    z = beta * (mean_logps[:, 0].astype(np.float64) - mean_logps[:, 1]) - gamma
    expected = -(1 - label_smoothing) * np_log_sigmoid(z) - label_smoothing * np_log_sigmoid(-z)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rewards, beta * mean_logps, rtol=1e-6)


def test_implicit_rewards_are_beta_times_policy_reference_log_ratio():
    policy, reference = random_logps(4)
    _, rewards = dpo.preference_losses(settings(loss="sigmoid", beta=0.25), policy, reference)
    np.testing.assert_allclose(rewards, 0.25 * (policy.astype(np.float64) - reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(loss="kto"), "config.dpo.loss"),
        (dict(beta=0.0), "config.dpo.beta"),
        (dict(label_smoothing=0.5), "config.dpo.label_smoothing"),
        (dict(loss="ipo", label_smoothing=0.1), "config.dpo.label_smoothing"),
        (dict(reference="cached"), "config.dpo.reference"),
        (dict(logprob_chunk_size=0), "config.dpo.logprob_chunk_size"),
    ],
)
def test_invalid_dpo_options_name_the_config_key(bad, key):
    config = run_config.base_config("dpo")
    config.dpo.update(bad)
    with pytest.raises(run_config.ConfigError, match=key):
        run_config.validate(config, num_devices=1)


# ---------------------------------------------------------------------------- loss_fn on a model

TINY = llama.get_preset("tiny", num_hidden_layers=1, pad_token_id=PAD)  # one layer: quicker to compile


def random_pair_batch(seed, *, pairs=4, seq_len=24, filler_rows=1):
    """Right-padded preference rows of random tokens: a shared prompt, then a response per side.

    The last ``filler_rows`` rows are filler (example_mask 0, loss masks 0), as the batcher makes them.
    """
    rng = np.random.default_rng(seed)
    batch = {}
    prompt_lengths = rng.integers(3, 8, pairs)
    prompts = [rng.integers(4, TINY.vocab_size, n) for n in prompt_lengths]
    for side in ("chosen", "rejected"):
        ids = np.full((pairs, seq_len), PAD, np.int32)
        attention = np.zeros((pairs, seq_len), np.int32)
        loss = np.zeros((pairs, seq_len), np.int32)
        for row, prompt in enumerate(prompts):
            response = rng.integers(4, TINY.vocab_size, rng.integers(2, seq_len - len(prompt)))
            length = len(prompt) + len(response)
            ids[row, :length] = np.concatenate([prompt, response])
            attention[row, :length] = 1
            loss[row, len(prompt) : length] = 1
        batch.update(
            {
                f"{side}_input_ids": ids,
                f"{side}_attention_mask": attention,
                f"{side}_position_ids": ((np.cumsum(attention, 1) - 1) * attention).astype(np.int32),
                f"{side}_loss_mask": loss,
            }
        )
    example_mask = np.ones(pairs, np.int32)
    example_mask[pairs - filler_rows :] = 0
    for side in ("chosen", "rejected"):
        batch[f"{side}_loss_mask"] = batch[f"{side}_loss_mask"] * example_mask[:, None]
    batch["example_mask"] = example_mask
    batch["example_index"] = np.arange(pairs, dtype=np.int32)
    batch["margin"] = np.zeros(pairs, np.float32)
    return batch


def np_response_logprobs(module, params, batch, side):
    """Summed log-probs and token counts of the responses, from the full logits in float64."""
    logits = np.asarray(
        jax.jit(module.apply)(
            {"params": params},
            batch[f"{side}_input_ids"],
            batch[f"{side}_attention_mask"],
            batch[f"{side}_position_ids"],
        ),
        np.float64,
    )
    peak = logits.max(-1, keepdims=True)
    log_probs = logits - (peak + np.log(np.sum(np.exp(logits - peak), -1, keepdims=True)))
    targets = batch[f"{side}_input_ids"][:, 1:]
    token_logps = np.take_along_axis(log_probs[:, :-1], targets[..., None], axis=-1)[..., 0]
    mask = batch[f"{side}_loss_mask"][:, 1:].astype(np.float64)
    return np.sum(token_logps * mask, 1), np.sum(mask, 1)


def dpo_options(**overrides):
    return dpo.DPOOptions(**overrides, logprob_chunk_size=8)  # several chunks per sequence, one ragged


def dpo_loss_fn(module, options, **kwargs):
    return dpo.make_loss_fn(module, TINY, options, chunk_size=options.logprob_chunk_size, **kwargs)


@pytest.fixture(scope="module")
def two_models():
    """The tiny causal LM and two different random parameter sets (policy, reference)."""
    module = llama.make_model(TINY)
    init = jax.jit(lambda key: module.init(key, np.zeros((1, 8), np.int32))["params"])
    return module, init(jax.random.key(0)), init(jax.random.key(1))


def with_loss_windows(batch):
    """The batch with the narrowest loss windows that cover both sides' responses (as the batcher adds)."""
    spans = [
        windows.ragged_spans(mask.ravel(), np.arange(0, mask.size + 1, mask.shape[1]))
        for mask in (batch["chosen_loss_mask"], batch["rejected_loss_mask"])
    ]
    width = int(np.max(spans))
    assert width < batch["chosen_input_ids"].shape[1]
    out = dict(batch)
    for side in ("chosen", "rejected"):
        out.update(windows.target_window(batch[f"{side}_input_ids"], batch[f"{side}_loss_mask"], width, f"{side}_"))
    return out


@pytest.mark.parametrize("windowed", [False, True], ids=["full_width", "loss_windows"])
@pytest.mark.parametrize("length_normalize", [False, True], ids=["summed", "length_normalised"])
def test_loss_fn_matches_numpy_dpo_on_full_softmax_logprobs(two_models, length_normalize, windowed):
    module, policy_params, reference_params = two_models
    beta = 0.5
    loss_fn = dpo_loss_fn(
        module, dpo_options(beta=beta, length_normalize=length_normalize), reference_model=(module, TINY)
    )
    batch = with_loss_windows(random_pair_batch(0)) if windowed else random_pair_batch(0)
    frozen = {"reference_params": reference_params}
    loss_sum, metrics = jax.jit(loss_fn)(policy_params, frozen, batch, jax.random.key(0))

    real = batch["example_mask"] == 1
    per_side = {}
    for side in ("chosen", "rejected"):
        policy, count = np_response_logprobs(module, policy_params, batch, side)
        reference, _ = np_response_logprobs(module, reference_params, batch, side)
        scale = np.maximum(count, 1.0) if length_normalize else 1.0  # filler rows have no tokens
        per_side[side] = (policy / scale, reference / scale, count)
    h = (per_side["chosen"][0] - per_side["chosen"][1]) - (per_side["rejected"][0] - per_side["rejected"][1])
    expected_losses = -np_log_sigmoid(beta * h)
    np.testing.assert_allclose(loss_sum, np.sum(expected_losses[real]), rtol=1e-4)
    assert metrics["loss"][1] == real.sum()
    reward_chosen = beta * (per_side["chosen"][0] - per_side["chosen"][1])
    np.testing.assert_allclose(metrics["reward_chosen"][0], np.sum(reward_chosen[real]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["logps_rejected"][0], np.sum(per_side["rejected"][0][real]), rtol=1e-4)
    np.testing.assert_allclose(metrics["ref_logps_chosen"][0], np.sum(per_side["chosen"][1][real]), rtol=1e-4)
    assert metrics["tokens_chosen"][0] == np.sum(per_side["chosen"][2][real])


def test_a_policy_equal_to_its_reference_scores_chance_accuracy_and_log_two_loss(two_models):
    module, policy_params, _ = two_models
    loss_fn = dpo_loss_fn(module, dpo_options(), reference_model=(module, TINY))
    frozen = {"reference_params": policy_params}
    _, metrics = jax.jit(loss_fn)(policy_params, frozen, random_pair_batch(1), jax.random.key(0))
    accuracy, pairs = metrics["accuracy"]
    assert accuracy / pairs == 0.5
    np.testing.assert_allclose(metrics["loss"][0] / metrics["loss"][1], np.log(2.0), rtol=1e-6)


def test_precomputed_table_lookup_gives_the_on_the_fly_loss(two_models):
    module, policy_params, reference_params = two_models
    batch = random_pair_batch(2)
    on_the_fly = dpo_loss_fn(module, dpo_options(), reference_model=(module, TINY))
    # A table of 10 rows whose rows 0..3 hold this batch's reference sums, the rest garbage.
    sums, _ = jax.jit(dpo.response_logprobs, static_argnums=(0, 1), static_argnames="chunk_size")(
        module, TINY, reference_params, batch, chunk_size=8
    )
    table = np.full((10, 2), -1e3, np.float32)
    table[batch["example_index"]] = np.asarray(sums)
    precomputed = dpo_loss_fn(module, dpo_options())
    frozen = {"reference_params": reference_params}
    loss_a, metrics_a = jax.jit(on_the_fly)(policy_params, frozen, batch, jax.random.key(0))
    loss_b, metrics_b = jax.jit(precomputed)(policy_params, {"reference_logps": table}, batch, jax.random.key(0))
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for name in metrics_a:
        np.testing.assert_allclose(metrics_a[name][0], metrics_b[name][0], rtol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------ the reference cache


@pytest.fixture()
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


COMPONENTS = {"dataset_fingerprint": "abc", "num_rows": 5, "reference": {"source": "/models/ref", "files_digest": "1"}}


def test_a_cached_entry_is_reused_without_recomputing(cache_dir):
    values = np.arange(10, dtype=np.float32).reshape(5, 2)
    first, hit_first = reference_cache.load_or_compute(cache_dir, COMPONENTS, lambda: values, shape=(5, 2))
    second, hit_second = reference_cache.load_or_compute(
        cache_dir, COMPONENTS, lambda: pytest.fail("recomputed a valid entry"), shape=(5, 2)
    )
    assert (hit_first, hit_second) == (False, True)
    np.testing.assert_array_equal(second, values)


def test_an_entry_recording_another_dataset_fingerprint_is_rejected_and_recomputed(cache_dir, caplog):
    path = reference_cache.store(cache_dir, COMPONENTS, np.zeros((5, 2), np.float32))
    meta_path = os.path.join(path, reference_cache.META_FILE)
    meta = json.loads(pathlib.Path(meta_path).read_text())
    meta["components"]["dataset_fingerprint"] = "stale"
    pathlib.Path(meta_path).write_text(json.dumps(meta))

    fresh = np.ones((5, 2), np.float32)
    with caplog.at_level(logging.WARNING, logger="easyppo.algorithms.reference_cache"):
        values, hit = reference_cache.load_or_compute(cache_dir, COMPONENTS, lambda: fresh, shape=(5, 2))
    assert not hit
    np.testing.assert_array_equal(values, fresh)
    assert "dataset_fingerprint: stored 'stale', expected 'abc'" in caplog.text
    np.testing.assert_array_equal(reference_cache.load(cache_dir, COMPONENTS, shape=(5, 2)), fresh)  # replaced


def test_an_entry_whose_values_were_altered_is_rejected(cache_dir, caplog):
    path = reference_cache.store(cache_dir, COMPONENTS, np.zeros((5, 2), np.float32))
    np.save(os.path.join(path, reference_cache.VALUES_FILE), np.full((5, 2), 7.0, np.float32))
    with caplog.at_level(logging.WARNING, logger="easyppo.algorithms.reference_cache"):
        assert reference_cache.load(cache_dir, COMPONENTS, shape=(5, 2)) is None
    assert "does not match the digest" in caplog.text


def test_an_entry_for_a_different_number_of_rows_is_rejected(cache_dir):
    reference_cache.store(cache_dir, COMPONENTS, np.zeros((5, 2), np.float32))
    assert reference_cache.load(cache_dir, COMPONENTS, shape=(6, 2)) is None


def test_rewriting_the_reference_checkpoint_in_place_changes_its_identity(tmp_path, reference_dir):
    directory = tmp_path / "ref"
    shutil.copytree(reference_dir, directory)
    model_cfg = run_config.base_config("dpo").model
    model_cfg.init_from = str(directory)
    before = reference_cache.model_identity(model_cfg, seed=0)
    assert reference_cache.model_identity(model_cfg, seed=0) == before  # stable while nothing changes

    weights = directory / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(weights.read_bytes()[::-1])  # new weights of exactly the same size, written later:
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # mtime moves on
    assert reference_cache.model_identity(model_cfg, seed=0) != before


# ------------------------------------------------------------------ trainers on real batches


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first rows of the demo's preference files, and one tokenisation cache for the module."""
    root = tmp_path_factory.mktemp("data")
    return {
        "train": first_rows(DEMO_DATA / "preference_train.jsonl", root / "train.jsonl", 256),
        "eval": first_rows(DEMO_DATA / "preference_eval.jsonl", root / "eval.jsonl", 32),
        "cache": str(root / "cache"),
    }


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, two_models):
    """A Hugging Face export of a random tiny model that differs from the policy's random init."""
    _, _, reference_params = two_models
    directory = tmp_path_factory.mktemp("reference") / "hf"
    huggingface.save_hf(str(directory), TINY, reference_params, pad_token_id=PAD)
    return str(directory)


def tiny_run_config(out: pathlib.Path, data: dict, **dpo_overrides):
    """A DPO run of the tiny model (random init) on the demo tokenizer and the first demo rows."""
    c = run_config.base_config("dpo")
    c.output_dir = str(out)
    c.model.preset = "tiny"
    c.model.num_hidden_layers = TINY.num_hidden_layers
    c.model.pad_token_id = PAD
    c.data.path = data["train"]
    c.eval.path = data["eval"]
    c.data.tokenizer_path = str(DEMO_DATA / "tokenizer.model")
    c.data.pad_id = PAD
    c.data.max_seq_len = 64
    c.data.max_prompt_len = 40
    c.data.global_batch_size = 16
    c.data.num_proc = 1
    c.data.cache_dir = data["cache"]
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.train.num_steps = 6
    c.train.log_every_steps = 1
    c.checkpoint.save_every_steps = 100
    c.checkpoint.async_save = False
    c.logging.progress_bar = False
    c.dpo.logprob_chunk_size = 16
    c.dpo.reference_cache_dir = str(out / "reference_cache")
    for key, value in dpo_overrides.items():
        c.dpo[key] = value
    return run_config.resolve_paths(c)


def prepared(config, split="train"):
    data_config = config.data if split == "train" else loop._eval_data_config(config)
    return pipeline.prepare_data(data_config)


def test_batches_carry_each_rows_batcher_position_as_example_index(tmp_path, small_data):
    data = prepared(tiny_run_config(tmp_path, small_data))
    batch = next(pipeline.make_iterator(data, tiny_run_config(tmp_path, small_data).data))
    assert sorted(set(batch["example_index"].tolist())) != list(range(16))  # shuffled, so not trivially 0..15
    for row, index in enumerate(batch["example_index"]):
        alone = data.batcher(np.array([index]), np.ones(1, np.int32))
        np.testing.assert_array_equal(alone["chosen_input_ids"][0], batch["chosen_input_ids"][row])
        np.testing.assert_array_equal(alone["rejected_input_ids"][0], batch["rejected_input_ids"][row])


def _first_batch(data, data_config, mesh):
    return sharding.host_local_to_global(next(pipeline.make_iterator(data, data_config)), mesh)


def test_the_precomputed_table_holds_each_rows_reference_logprobs(tmp_path, small_data, reference_dir, two_models):
    module, _, reference_params = two_models
    config = tiny_run_config(tmp_path, small_data, reference="precomputed", reference_init_from=reference_dir)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    data = prepared(config)
    table = dpo.reference_tables(config, dpo.ALGORITHM.options(config), mesh, {"train": data})["train"]
    batch = _first_batch(data, config.data, mesh)  # shuffled rows
    on_the_fly, _ = jax.jit(dpo.response_logprobs, static_argnums=(0, 1), static_argnames="chunk_size")(
        module, TINY, reference_params, batch, chunk_size=16
    )
    np.testing.assert_allclose(table[np.asarray(batch["example_index"])], on_the_fly, rtol=1e-6)


def test_precomputed_and_on_the_fly_references_give_the_same_held_out_metrics(
    tmp_path, small_data, reference_dir, two_models
):
    """The eval path looks rows up in the eval split's own table, not the train split's."""
    module, _, reference_params = two_models
    config = tiny_run_config(tmp_path, small_data, reference="precomputed", reference_init_from=reference_dir)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    trainer = loop.trainer_for(config, mesh, 6, train_data=prepared(config), eval_data=prepared(config, "eval"))
    state = trainer.init_state()
    batch = _first_batch(prepared(config, "eval"), loop._eval_data_config(config), mesh)
    precomputed = jax.device_get(trainer.eval_step(state, batch))

    options = dpo.ALGORITHM.options(config)
    on_the_fly_loss = dpo.make_loss_fn(
        module, TINY, options, chunk_size=options.logprob_chunk_size, reference_model=(module, TINY)
    )
    frozen = {"reference_params": reference_params}
    _, on_the_fly = jax.jit(on_the_fly_loss)(state.params, frozen, batch, jax.random.key(0))
    assert abs(on_the_fly["loss"][0] / on_the_fly["loss"][1] - np.log(2)) > 1e-3  # reference != policy
    assert precomputed.keys() == on_the_fly.keys()
    for name, (total, count) in on_the_fly.items():
        np.testing.assert_allclose(precomputed[name][0], total, rtol=1e-5, atol=1e-5, err_msg=name)
        assert precomputed[name][1] == count, name


def test_a_cached_reference_table_is_reused_without_loading_the_reference(
    tmp_path, small_data, reference_dir, monkeypatch
):
    config = tiny_run_config(tmp_path, small_data, reference="precomputed", reference_init_from=reference_dir)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    splits = {"train": prepared(config), "eval": prepared(config, "eval")}
    options = dpo.ALGORITHM.options(config)
    first = dpo.reference_tables(config, options, mesh, splits)
    monkeypatch.setattr(
        dpo_reference, "load_model", lambda *a, **k: pytest.fail("loaded the reference despite a cache hit")
    )
    second = dpo.reference_tables(config, options, mesh, splits)
    assert first.keys() == second.keys() == {"train", "eval"}
    for split in first:
        np.testing.assert_array_equal(first[split], second[split])


def test_the_sharded_step_equals_the_single_device_step(tmp_path, small_data, reference_dir):
    """On a (2, 2, 2) mesh, with the on-the-fly reference sharded like the policy."""
    config = tiny_run_config(tmp_path, small_data, reference_init_from=reference_dir)
    data = prepared(config)
    results = []
    for shape, devices in (((2, 2, 2), jax.devices()), ((1, 1, 1), jax.devices()[:1])):
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
        mesh = sharding.make_mesh(config.mesh, devices=devices)
        trainer = loop.trainer_for(config, mesh, 6, train_data=data)
        batch = _first_batch(data, config.data, mesh)
        result = trainer.train_step(trainer.init_state(), batch, jax.random.key(0), step=0)
        results.append((jax.device_get(result.state.params), jax.device_get(result.metrics)))
    (sharded, sharded_metrics), (single, single_metrics) = results
    for name in single_metrics:
        np.testing.assert_allclose(sharded_metrics[name], single_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), sharded, single)


# ------------------------------------------------------------------------------- the train loop


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, small_data):
    """One demo-style run through the train loop, stopped half-way and resumed.

    Random-init policy (its own reference), precomputed reference; the resumed half counts how often
    it had to compute reference log-probs.
    """
    out = tmp_path_factory.mktemp("run")
    config = tiny_run_config(out, small_data, reference="precomputed")
    config.train.num_steps = 30
    config.train.stop_at_step = 15
    config.train.export_hf_dir = str(out / "hf")
    config.eval.at_start = True
    first = loop.train(config)
    computed = []
    original = dpo_reference.compute_reference_table
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dpo_reference, "compute_reference_table", lambda *a, **k: computed.append(1) or original(*a, **k))
        config.train.stop_at_step = 0
        second = loop.train(config)
    return {"first": first, "second": second, "reference_passes_on_resume": len(computed), "export": out / "hf"}


def test_dpo_raises_held_out_preference_accuracy_well_above_chance(interrupted_run):
    """The demo's rule (more cheerful adjectives wins) is learnt from a random-init policy."""
    first, second = interrupted_run["first"], interrupted_run["second"]
    assert (first.status, first.step, second.status, second.step) == ("stopped", 15, "completed", 30)
    assert first.initial_eval_metrics["accuracy"] == 0.5  # policy == reference: every pair ties
    assert second.eval_metrics["accuracy"] >= 0.85, second.eval_metrics
    assert second.eval_metrics["reward_margin"] > 0.2, second.eval_metrics


def test_a_resumed_run_reuses_the_cached_reference_logprobs(interrupted_run):
    assert interrupted_run["reference_passes_on_resume"] == 0


def test_a_finished_run_exports_a_loadable_hugging_face_model(interrupted_run):
    config, _, params = huggingface.load_hf(str(interrupted_run["export"]), "causal_lm")
    assert (config.vocab_size, config.num_hidden_layers) == (TINY.vocab_size, TINY.num_hidden_layers)
    assert "lm_head" in params


# ------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow  # two 8-device compiles and the peak matmuls
def test_the_step_benchmark_reports_both_reference_modes(capsys):
    sys.path.insert(0, str(REPO))  # benchmarks/ is not an installed package
    from benchmarks import dpo_step

    report = dpo_step.main(
        [
            "--hidden=32",
            "--layers=1",
            "--heads=4",
            "--vocab=128",
            "--seq_len=16",
            "--batch=8",
            "--steps=1",
            "--peak_size=128",
            "--peak_repeats=1",
        ]
    )
    assert json.loads(capsys.readouterr().out) == report
    on_the_fly, precomputed = report["runs"]
    assert (on_the_fly["setting"]["reference"], precomputed["setting"]["reference"]) == ("on_the_fly", "precomputed")
    assert precomputed["flops_per_step"]["reference"] == 0
    assert on_the_fly["flops_per_step"]["total"] == pytest.approx(4 / 3 * precomputed["flops_per_step"]["total"])
    for run in report["runs"]:
        assert run["tokens_per_s"] > 0 and run["mfu"]["float32"] > 0 and np.isfinite(run["loss"])
