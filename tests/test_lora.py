"""LoRA: adapters that start at the base, switch off into the reference, shard like their kernels,
and move to and from the ``peft`` library with the same numbers.

The peft tests are the independent reference: a tiny random ``transformers`` model is the base, and
``peft`` itself applies (or creates) the adapter.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from easyppo.core import sharding
from easyppo.core.options import OptionError
from easyppo.models import llama, lora, partitioning
from easyppo.weights import huggingface, loading, peft_adapters

TINY = llama.get_preset("tiny", pad_token_id=0)
SPEC = lora.LoraConfig(rank=4, alpha=8.0)
IDS = jnp.array([[5, 17, 99, 3, 250, 7, 8, 1], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
SINGLE = {"data": 1, "fsdp": 1, "tensor": 1}


def _model_cfg(**lora_keys) -> ml_collections.ConfigDict:
    cfg = loading.default_config()
    cfg.preset = "tiny"
    cfg.pad_token_id = 0
    cfg.lora.update(lora_keys)
    return cfg


def _with_random_adapters(params, seed: int = 3, scale: float = 0.3):
    """Non-zero adapters, so that a test can tell adapted from base outputs."""
    flat = traverse_util.flatten_dict(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    flat = {
        path: scale * jax.random.normal(next(keys), leaf.shape, leaf.dtype) if lora.is_adapter(path) else leaf
        for path, leaf in flat.items()
    }
    return traverse_util.unflatten_dict(flat)


def _logits(config, params, ids=IDS):
    return np.asarray(llama.make_model(config).apply({"params": params}, ids))


# ------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("layout", ["unrolled", "scanned", "fused"])
def test_an_adapted_model_starts_exactly_at_the_base_a_full_run_would_load(layout):
    settings = dict(scan_layers=layout == "scanned", fuse_projections=layout == "fused")
    mesh = sharding.make_mesh(SINGLE, jax.devices()[:1])
    rng = jax.random.key(0)
    full_cfg, adapted_cfg = _model_cfg(), _model_cfg(rank=4)
    for cfg in (full_cfg, adapted_cfg):
        cfg.update(settings)
    full_config, _, full = loading.load_model(full_cfg, "causal_lm", mesh=mesh, rng=rng)
    config, _, params = loading.load_model(adapted_cfg, "causal_lm", mesh=mesh, rng=rng)
    trained, base = lora.split(params)
    jax.tree.map(np.testing.assert_array_equal, base, full)  # the same base, bit for bit
    assert set(traverse_util.flatten_dict(trained)) == {
        path for path in traverse_util.flatten_dict(params) if path[-1] in ("lora_a", "lora_b")
    }
    np.testing.assert_array_equal(_logits(config, params), _logits(full_config, full))


def test_the_base_tree_alone_is_the_model_with_its_adapters_switched_off():
    config = TINY.replace(lora=SPEC)
    params = _with_random_adapters(llama.init_params(config, "causal_lm", jax.random.key(0)))
    _, base = lora.split(params)
    np.testing.assert_array_equal(_logits(config, base), _logits(TINY, base))
    assert np.abs(_logits(config, params) - _logits(config, base)).max() > 1e-2


def test_merged_weights_compute_the_adapted_forward():
    for scan in (False, True):
        config = TINY.replace(lora=SPEC, scan_layers=scan)
        params = _with_random_adapters(llama.init_params(config, "causal_lm", jax.random.key(1)))
        merged = lora.merged_weights(params, SPEC)
        assert not any(lora.is_adapter(path) for path in traverse_util.flatten_dict(merged))
        np.testing.assert_allclose(
            _logits(config.replace(lora=None), merged), _logits(config, params), atol=2e-5, rtol=1e-5
        )


def test_adapter_targets_limit_which_projections_get_adapters():
    config = TINY.replace(lora=lora.LoraConfig(rank=2, targets=("q_proj", "v_proj")))
    params = llama.init_params(config, "causal_lm", jax.random.key(0))
    adapted = {path[-2] for path in traverse_util.flatten_dict(lora.adapters(params))}
    assert adapted == {"q_proj", "v_proj"}
    q_shape, v_shape = (64, 4 * 16), (64, 2 * 16)  # [in, out]: 4 query heads, 2 key-value heads of 16
    assert lora.count(lora.adapters(params)) == TINY.num_hidden_layers * 2 * (sum(q_shape) + sum(v_shape))


def test_dropout_acts_only_in_training_passes():
    config = TINY.replace(lora=lora.LoraConfig(rank=4, dropout=0.5))
    params = _with_random_adapters(llama.init_params(config, "causal_lm", jax.random.key(0)))
    module = llama.make_model(config)
    plain = module.apply({"params": params}, IDS)
    assert np.array_equal(plain, module.apply({"params": params}, IDS, rngs=lora.dropout_rngs(None)))
    dropped = module.apply({"params": params}, IDS, rngs=lora.dropout_rngs(jax.random.key(1)))
    assert np.abs(np.asarray(dropped - plain)).max() > 1e-3


def test_adapters_are_split_like_their_kernels_and_unknown_leaves_are_still_refused():
    for scan in (False, True):
        config = TINY.replace(lora=SPEC, scan_layers=scan)
        shapes = llama.abstract_params(config, "causal_lm")
        specs = traverse_util.flatten_dict(sharding.partition_specs(shapes, partitioning.LLAMA_RULES))
        flat = {"/".join(path): spec for path, spec in specs.items()}
        lead = (None,) if scan else ()
        for name, spec in flat.items():
            if not name.endswith("/lora_a"):
                continue
            kernel = flat[name.replace("lora_a", "kernel")]
            assert spec == P(*lead, kernel[len(lead)], None), name  # lora_a [in, r]: the kernel's input split
            assert flat[name.replace("lora_a", "lora_b")] == P(*lead, None, kernel[len(lead) + 1]), name
    with pytest.raises(ValueError, match="no partition rule matches parameter 'model/layers_0/mlp/up_proj/lora_c'"):
        sharding.partition_specs(
            {"model": {"layers_0": {"mlp": {"up_proj": {"lora_c": jnp.zeros((4, 4))}}}}}, partitioning.LLAMA_RULES
        )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rank", -2, "model.lora.rank: must be >= 0"),
        ("alpha", 0.0, "model.lora.alpha: must be > 0"),
        ("dropout", 1.0, r"model.lora.dropout: must be in \[0, 1\)"),
        ("targets", "q_proj,qkv", "model.lora.targets: 'q_proj,qkv' must name some of q_proj"),
        ("export", "adapter", "model.lora.export: 'adapter' is not one of"),
    ],
)
def test_a_bad_lora_setting_is_refused_naming_its_key(key, value, message):
    cfg = _model_cfg(rank=4)
    cfg.lora[key] = value
    with pytest.raises(OptionError, match=message):
        loading.resolve_architecture(cfg)


def test_an_adapter_to_continue_from_is_checked_before_any_weight_loads(tmp_path):
    cfg = _model_cfg(rank=4, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(OptionError, match=r"model.lora.init_from: no adapter_config.json \(not a peft adapter\)"):
        loading.resolve_architecture(cfg)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    cfg.lora.init_from = str(tmp_path / "adapter")
    with pytest.raises(OptionError, match=r"model.lora.init_from: .*adapter_config.json: r=8 does not match"):
        loading.resolve_architecture(cfg)
    with pytest.raises(OptionError, match=r"model.lora.init_from: is set, but model.lora.rank is 0"):
        loading.resolve_architecture(_model_cfg(rank=0, init_from=str(tmp_path / "adapter")))


def test_frozen_models_never_carry_adapters(tmp_path):
    assert loading.resolve_architecture(loading.frozen_config(_model_cfg(rank=8))).lora is None
    continued = _model_cfg(rank=8, init_from=str(tmp_path / "adapter"))  # a policy continuing from an adapter
    assert loading.resolve_architecture(loading.frozen_config(continued)).lora is None  # its reference: the base


# ---------------------------------------------------------------------------------------- peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF_SHAPE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
HF_IDS = np.array([[5, 17, 99, 3, 21, 7, 8, 1], [1, 2, 3, 4, 5, 6, 7, 8]], np.int64)
TOLERANCE = 2e-5


def _hf_base(tmp_path, kind: str) -> str:
    """A tiny random HF model (wide weights, so logits are O(1)) saved as the base."""
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM if kind == "causal_lm" else transformers.LlamaForSequenceClassification
    model = cls(transformers.LlamaConfig(**HF_SHAPE, num_labels=1, torch_dtype="float32"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    return str(tmp_path / "base")


def _hf_load(directory: str, kind: str):
    cls = transformers.LlamaForCausalLM if kind == "causal_lm" else transformers.LlamaForSequenceClassification
    return cls.from_pretrained(directory, torch_dtype=torch.float32).eval()


def _torch_out(model, kind: str) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(HF_IDS)).logits
    return out.numpy() if kind == "causal_lm" else out[:, 0].numpy()


def _easyppo_out(config, params, kind: str) -> np.ndarray:
    return np.asarray(llama.make_model(config, kind).apply({"params": params}, jnp.asarray(HF_IDS, jnp.int32)))


@pytest.mark.parametrize("kind", ["causal_lm", "reward"])
def test_peft_applies_an_exported_adapter_to_the_hf_base_with_easyppos_numbers(tmp_path, kind):
    base_dir = _hf_base(tmp_path, kind)
    spec = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    base_config, _, base = huggingface.load_hf(base_dir, kind)
    config = base_config.replace(lora=spec)
    adapters = _with_random_adapters(llama.init_params(config, kind, jax.random.key(0)), scale=0.2)
    params = lora.merge(lora.adapters(adapters), base)
    if kind != "causal_lm":  # the head is trained too: export a changed one
        params["score"]["kernel"] = params["score"]["kernel"] * 1.5
    peft_adapters.save_adapter(str(tmp_path / "adapter"), config, params, kind, base_model=base_dir)

    stored = json.loads((tmp_path / "adapter" / peft_adapters.ADAPTER_CONFIG_FILE).read_text())
    assert (stored["r"], stored["lora_alpha"], stored["base_model_name_or_path"]) == (4, 8.0, base_dir)
    adapted = peft.PeftModel.from_pretrained(_hf_load(base_dir, kind), str(tmp_path / "adapter")).eval()
    ours = _easyppo_out(config, params, kind)
    np.testing.assert_allclose(_torch_out(adapted, kind), ours, atol=TOLERANCE, rtol=TOLERANCE)
    assert np.abs(ours - _easyppo_out(base_config, base, kind)).max() > 1e-2  # the adapter matters

    # The merged export is the same model as plain weights.
    huggingface.save_hf(str(tmp_path / "merged"), base_config, lora.merged_weights(params, spec), kind)
    merged = _torch_out(_hf_load(str(tmp_path / "merged"), kind), kind)
    np.testing.assert_allclose(merged, ours, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("scan", [False, True])
def test_an_adapter_made_by_peft_imports_with_peft_s_numbers(tmp_path, scan):
    base_dir = _hf_base(tmp_path, "causal_lm")
    torch.manual_seed(1)
    peft_config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "gate_proj", "up_proj"], init_lora_weights=False
    )
    made = peft.get_peft_model(_hf_load(base_dir, "causal_lm"), peft_config).eval()
    made.save_pretrained(str(tmp_path / "theirs"))
    expected = _torch_out(made, "causal_lm")

    cfg = loading.default_config()
    cfg.update(init_from=base_dir, scan_layers=scan)
    cfg.lora.update(rank=8, alpha=16.0, targets="q_proj,k_proj,gate_proj,up_proj", init_from=str(tmp_path / "theirs"))
    mesh = sharding.make_mesh(SINGLE, jax.devices()[:1])
    config, _, params = loading.load_model(cfg, "causal_lm", mesh=mesh, rng=jax.random.key(0))
    np.testing.assert_allclose(_easyppo_out(config, params, "causal_lm"), expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_an_adapter_that_does_not_match_model_lora_is_refused_naming_file_and_field(tmp_path):
    base_dir = _hf_base(tmp_path, "causal_lm")
    made = peft.get_peft_model(_hf_load(base_dir, "causal_lm"), peft.LoraConfig(r=8, target_modules=["q_proj"]))
    made.save_pretrained(str(tmp_path / "theirs"))
    cfg = loading.default_config()
    cfg.init_from = base_dir
    cfg.lora.update(rank=4, targets="q_proj", init_from=str(tmp_path / "theirs"))
    mesh = sharding.make_mesh(SINGLE, jax.devices()[:1])
    with pytest.raises(ValueError, match=r"adapter_config.json: r=8 does not match this run's model.lora \(r 4\)"):
        loading.load_model(cfg, "causal_lm", mesh=mesh, rng=jax.random.key(0))
