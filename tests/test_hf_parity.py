"""Numerical parity of converted models with Hugging Face ``transformers`` (the independent reference).

Every test builds a tiny random ``transformers`` model on the fly (no network), converts it one way
or the other, and compares outputs on the same tokens. Weights are drawn wider than HF's std-0.02
init and the norm scales are randomised, so logits and scores are O(1) and a wrong transpose,
layer order, RoPE variant or head would show up far above the 1e-4 tolerance.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easyppo.core import sharding
from easyppo.models import (
    llama,
    partitioning,
)
from easyppo.weights import huggingface

TOLERANCE = 1e-4

BASE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2, head_dim=16),  # head_dim != hidden / heads, as some models have
    # original_max_position_embeddings=4 puts the test's positions in every llama3 frequency band.
    "llama3_rope": dict(
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=4,
        ),
    ),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
}


def _randomize(model: "torch.nn.Module", seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=generator)
            else:
                p.normal_(0.0, 0.3, generator=generator)


def _widen(params, seed: int):
    """easyppo's counterpart of ``_randomize``: std 0.02 -> 0.3, and norm scales drawn from U(0.5, 1.5)
    (init makes them all ones, which would hide a swapped pair of norms)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    widened = [
        jax.random.uniform(key, x.shape, x.dtype, 0.5, 1.5) if path[-1].key == "scale" else x * 15.0
        for (path, x), key in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, widened)


def _hf_model(model_class, overrides: dict, seed: int = 0, **extra):
    config = transformers.LlamaConfig(**{**BASE, **overrides, **extra})
    model = model_class(config).eval()
    _randomize(model, seed)
    return model


def _save(model, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


def _tokens(shape, seed=0, low=3):
    return np.random.default_rng(seed).integers(low, BASE["vocab_size"], size=shape).astype(np.int32)


def _torch_long(x):
    return torch.from_numpy(np.asarray(x, np.int64))


def _apply(module, params, ids, mask=None):
    forward = jax.jit(lambda p, i, m: module.apply({"params": p}, i, attention_mask=m))
    return np.asarray(forward(params, ids, mask))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=_torch_long(ids)).logits.numpy()


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------ causal LM


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_of_loaded_hf_model_match_transformers(name, tmp_path):
    hf = _hf_model(transformers.LlamaForCausalLM, CONFIGS[name])
    config, module, params = huggingface.load_hf(_save(hf, tmp_path), "causal_lm")
    ids = _tokens((2, 12))
    reference = _hf_logits(hf, ids)
    assert np.abs(reference).max() > 1.0  # outputs large enough for the tolerance to mean something
    assert _max_diff(_apply(module, params, ids), reference) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_reproduces_logits_of_exported_random_easyppo_model(name, tmp_path):
    config = llama.LlamaConfig.from_hf_dict(transformers.LlamaConfig(**{**BASE, **CONFIGS[name]}).to_dict())
    params = _widen(llama.init_params(config, "causal_lm", jax.random.key(1)), seed=2)
    huggingface.save_hf(str(tmp_path), config, params, "causal_lm")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _tokens((2, 12), seed=1)
    reference = _hf_logits(hf, ids)
    assert np.abs(reference).max() > 1.0
    assert _max_diff(_apply(llama.make_model(config), params, ids), reference) <= TOLERANCE


def test_scan_layers_loading_stacks_layers_and_matches_transformers(tmp_path):
    hf = _hf_model(transformers.LlamaForCausalLM, CONFIGS["gqa"], num_hidden_layers=3)
    config, module, params = huggingface.load_hf(_save(hf, tmp_path), scan_layers=True)
    q_kernel = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q_kernel[2], hf.model.layers[2].self_attn.q_proj.weight.detach().numpy().T)
    ids = _tokens((2, 12), seed=2)
    assert _max_diff(_apply(module, params, ids), _hf_logits(hf, ids)) <= TOLERANCE


def test_bfloat16_checkpoint_loads_in_bfloat16_and_stays_close_to_transformers(tmp_path):
    hf = _hf_model(transformers.LlamaForCausalLM, CONFIGS["gqa"]).to(torch.bfloat16)
    config, module, params = huggingface.load_hf(_save(hf, tmp_path), dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert params["lm_head"]["kernel"].dtype == np.dtype("bfloat16")
    ids = _tokens((2, 12), seed=3)
    with torch.no_grad():
        reference = hf(input_ids=_torch_long(ids)).logits.float().numpy()
    # bfloat16 has 8 significant bits; the two implementations round at different points.
    assert _max_diff(_apply(module, params, ids), reference) <= 0.05 * np.abs(reference).max()


# ------------------------------------------------------------------------------ reward and value


def _padded(rows, length, side, pad_id=0):
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    hf = _hf_model(transformers.LlamaForSequenceClassification, CONFIGS["gqa"], seed=4, num_labels=1)
    directory = _save(hf, tmp_path_factory.mktemp("reward"))
    return hf, directory


ROWS = [_tokens((7,), seed=5), _tokens((11,), seed=6), _tokens((4,), seed=7)]


def test_reward_scores_match_transformers_on_right_padded_batch(reward_model):
    hf, directory = reward_model
    _, module, params = huggingface.load_hf(directory, "reward")
    ids, mask = _padded(ROWS, 11, "right")
    with torch.no_grad():  # transformers finds the last real token through pad_token_id
        reference = hf(input_ids=_torch_long(ids), attention_mask=_torch_long(mask)).logits[:, 0].numpy()
    assert np.abs(reference).max() > 0.5
    assert _max_diff(_apply(module, params, ids, mask), reference) <= TOLERANCE


def test_reward_scores_match_transformers_on_left_padded_batch(reward_model):
    hf, directory = reward_model
    _, module, params = huggingface.load_hf(directory, "reward")
    ids, mask = _padded(ROWS, 11, "left")
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # what easyppo derives from the mask
    with torch.no_grad():
        reference = (
            hf(input_ids=_torch_long(ids), attention_mask=_torch_long(mask), position_ids=_torch_long(positions))
            .logits[:, 0]
            .numpy()
        )
    assert _max_diff(_apply(module, params, ids, mask), reference) <= TOLERANCE


def test_reward_scores_match_transformers_when_the_pad_id_is_eos_and_rows_end_in_eos(tmp_path):
    """Llama 3 checkpoints often set pad_token_id = eos_token_id; transformers then reads each row's
    score at its last non-EOS token, and so must easyppo (it read the final EOS before)."""
    eos = BASE["eos_token_id"]
    hf = _hf_model(
        transformers.LlamaForSequenceClassification, {**CONFIGS["gqa"], "pad_token_id": eos}, seed=8, num_labels=1
    )
    _, module, params = huggingface.load_hf(_save(hf, tmp_path), "reward")
    rows = [np.append(row, eos) for row in ROWS]  # every response ends with EOS, as chat data does
    ids, mask = _padded(rows, 12, "right", pad_id=eos)
    with torch.no_grad():
        reference = hf(input_ids=_torch_long(ids), attention_mask=_torch_long(mask)).logits[:, 0].numpy()
    assert _max_diff(_apply(module, params, ids, mask), reference) <= TOLERANCE
    last_real = _apply(module, params, ids, np.where(ids == eos, 0, mask))  # scoring without the final EOS
    assert _max_diff(last_real, reference) <= TOLERANCE


def test_values_match_the_transformers_score_head_at_every_real_token(reward_model):
    hf, directory = reward_model
    _, module, params = huggingface.load_hf(directory, "value")
    ids, mask = _padded(ROWS, 11, "right")
    with torch.no_grad():
        hidden = hf.model(input_ids=_torch_long(ids), attention_mask=_torch_long(mask)).last_hidden_state
        reference = hf.score(hidden)[..., 0].numpy()
    values = _apply(module, params, ids, mask)
    assert values.shape == ids.shape
    real = mask.astype(bool)
    assert _max_diff(values[real], reference[real]) <= TOLERANCE


# ------------------------------------------------------------------------------ sharded loading


def _mesh():
    return jax.make_mesh((1, 4, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_loading_onto_a_mesh_places_each_device_its_slice_of_the_hf_tensor(tmp_path):
    hf = _hf_model(transformers.LlamaForCausalLM, CONFIGS["gqa"])
    mesh = _mesh()
    _, module, params = huggingface.load_hf(_save(hf, tmp_path), scan_layers=True, mesh=mesh)
    expected = sharding.named_shardings(params, mesh, partitioning.LLAMA_RULES)
    for leaf, expected_sharding in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(expected_sharding, leaf.ndim)
    stacked_up = np.stack([layer.mlp.up_proj.weight.detach().numpy().T for layer in hf.model.layers])
    up_kernel = params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert len({str(shard.index) for shard in up_kernel.addressable_shards}) > 1  # really split
    for shard in up_kernel.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), stacked_up[shard.index])
    ids = _tokens((8, 12), seed=8)
    with jax.set_mesh(mesh):
        logits = _apply(module, params, ids)
    assert _max_diff(logits, _hf_logits(hf, ids)) <= TOLERANCE


def test_sharded_loading_reads_only_each_devices_slice_from_disk(tmp_path, monkeypatch):
    hf = _hf_model(transformers.LlamaForCausalLM, CONFIGS["mha"])
    directory = _save(hf, tmp_path)
    reads = []
    original_read = huggingface.hf_files.HFCheckpoint.read

    def recording_read(self, name, index=None):
        out = original_read(self, name, index)
        reads.append((name, out.size))
        return out

    monkeypatch.setattr(huggingface.hf_files.HFCheckpoint, "read", recording_read)
    huggingface.load_hf(directory, mesh=_mesh())
    q_weight = hf.model.layers[0].self_attn.q_proj.weight
    q_reads = [size for name, size in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    # q_proj is split 4 ways over fsdp and 2 over tensor: eight distinct eighths, each read once.
    assert q_reads == [q_weight.numel() // 8] * 8
