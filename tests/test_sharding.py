"""Specification of easyppo.core.sharding on an 8-device emulated CPU mesh (data=2, fsdp=2, tensor=2).

The expected layout of every LLaMA parameter is written out below from the documented Megatron + FSDP
scheme, not read back from ``partitioning.LLAMA_RULES``; sharded forwards are compared with the plain
single-device forward of the same parameters.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.core import sharding
from easyppo.models import llama, partitioning

MESH_SIZES = {"data": 2, "fsdp": 2, "tensor": 2}
SEQ_LEN = 8

# Layout of one (unscanned) parameter, keyed by the last two components of its path.
EXPECTED_SPECS = {
    "embed_tokens/embedding": ("tensor", "fsdp"),
    "q_proj/kernel": ("fsdp", "tensor"),
    "k_proj/kernel": ("fsdp", "tensor"),
    "v_proj/kernel": ("fsdp", "tensor"),
    "o_proj/kernel": ("tensor", "fsdp"),
    "gate_proj/kernel": ("fsdp", "tensor"),
    "up_proj/kernel": ("fsdp", "tensor"),
    "down_proj/kernel": ("tensor", "fsdp"),
    "input_layernorm/scale": (),
    "post_attention_layernorm/scale": (),
    "norm/scale": (),
    "lm_head/kernel": ("fsdp", "tensor"),
    "score/kernel": ("fsdp", None),
}


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should emulate 8 CPU devices"
    return sharding.make_mesh(ml_collections.ConfigDict(MESH_SIZES))


def path_str(path):
    return jax.tree_util.keystr(path, simple=True, separator="/")


def expected_spec(path: str, scan_layers: bool) -> tuple:
    spec = EXPECTED_SPECS["/".join(path.split("/")[-2:])]
    return (None, *spec) if scan_layers and path.startswith("model/layers/") else spec


def expected_shard_shape(shape, spec) -> tuple:
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(size // (1 if axis is None else MESH_SIZES[axis]) for size, axis in zip(shape, spec))


def assert_sharded_as(leaf, path: str, spec: tuple, mesh) -> None:
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), leaf.ndim), (
        f"{path}: {leaf.sharding.spec} != {spec}"
    )
    assert len(leaf.addressable_shards) == 8
    for shard in leaf.addressable_shards:
        assert shard.data.shape == expected_shard_shape(leaf.shape, spec), path


def tiny_config(**overrides) -> llama.LlamaConfig:
    return llama.get_preset("tiny", **overrides)


def init_fn(config, kind):
    model = llama.make_model(config, kind)
    return lambda rng: model.init(rng, jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]


@functools.cache
def random_params(config: llama.LlamaConfig, kind: str) -> dict:
    """Host (NumPy) parameters of the right shapes; random norm scales so that every weight matters."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(init_fn(config, kind), jax.random.key(0))

    def draw(path, leaf):
        if path_str(path).endswith("scale"):
            return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
        return (0.05 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def left_padded_batch(vocab_size: int):
    rng = np.random.default_rng(1)
    input_ids = rng.integers(0, vocab_size, size=(4, SEQ_LEN)).astype(np.int32)
    attention_mask = np.ones((4, SEQ_LEN), np.int32)
    attention_mask[0, :3] = 0
    attention_mask[2, :1] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ------------------------------------------------------------------------------------------------
# The mesh
# ------------------------------------------------------------------------------------------------


def test_make_mesh_has_auto_axes_data_fsdp_tensor_over_all_devices(mesh):
    assert dict(mesh.shape) == MESH_SIZES
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
        ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
        ({"data": 1, "fsdp": 2, "tensor": -1}, (1, 2, 4)),
        ({"data": 1, "fsdp": 8, "tensor": 1}, (1, 8, 1)),
    ],
)
def test_resolve_mesh_shape_fills_in_the_minus_one(sizes, expected):
    assert sharding.resolve_mesh_shape(ml_collections.ConfigDict(sizes), 8) == expected


def test_default_mesh_config_is_fsdp_over_every_device():
    mesh = sharding.make_mesh(sharding.default_config())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_make_mesh_uses_only_the_devices_given():
    devices = jax.devices()[4:]
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 2}, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert set(mesh.devices.flat) == set(devices)


def test_mesh_whose_product_is_not_the_device_count_names_keys_and_device_count():
    with pytest.raises(ValueError, match=r"mesh\.data=3 \* mesh\.fsdp=1 \* mesh\.tensor=2 = 6.*8 devices"):
        sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 2})


def test_minus_one_that_cannot_be_resolved_is_an_error():
    with pytest.raises(ValueError, match=r"do(es)? not divide the 8 available devices.*mesh\.fsdp=-1"):
        sharding.resolve_mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": -1, "fsdp": -1, "tensor": 2}, r"only one mesh size may be -1"),
        ({"data": 0, "fsdp": -1, "tensor": 2}, r"mesh\.data=0 must be a positive integer or -1"),
        ({"data": 2, "fsdp": 2.0, "tensor": 2}, r"mesh\.fsdp=2\.0 must be a positive integer"),
        ({"data": 2, "fsdp": 2}, r"mesh\.tensor is missing"),
    ],
)
def test_invalid_mesh_sizes_are_rejected_by_key(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(sizes, 8)


# ------------------------------------------------------------------------------------------------
# Model versus mesh
# ------------------------------------------------------------------------------------------------


def test_tiny_model_fits_the_2x2x2_mesh(mesh):
    partitioning.check_model_fits_mesh(tiny_config(), mesh)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vocab_size": 511}, r"vocab_size=511 is not divisible by mesh axis tensor=2"),
        ({"num_key_value_heads": 1}, r"num_key_value_heads=1 is not divisible by mesh axis tensor=2"),
        (
            {"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 16},
            r"num_attention_heads=3 is not divisible by mesh axis tensor=2",
        ),
        ({"intermediate_size": 171}, r"intermediate_size=171 is not divisible by mesh axis tensor=2"),
        ({"hidden_size": 63, "head_dim": 16}, r"hidden_size=63 is not divisible by mesh axis fsdp=2"),
    ],
)
def test_model_that_does_not_divide_the_mesh_names_field_and_axis(mesh, overrides, message):
    with pytest.raises(ValueError, match=message):
        partitioning.check_model_fits_mesh(tiny_config(**overrides), mesh)


def test_indivisible_parameter_dimension_is_reported_with_its_path(mesh):
    tree = {"model": {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((511, 64), jnp.float32)}}}
    with pytest.raises(ValueError, match=r"'model/embed_tokens/embedding'.*dimension 0 \(size 511\)"):
        sharding.named_shardings(tree, mesh, partitioning.LLAMA_RULES)


def test_rule_naming_an_axis_the_mesh_lacks_is_an_error(mesh):
    tree = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
    with pytest.raises(ValueError, match=r"'w' is sharded over \['model'\], which are not axes of the mesh"):
        sharding.named_shardings(tree, mesh, [(r"^w$", P("model"))])


# ------------------------------------------------------------------------------------------------
# Partition rules
# ------------------------------------------------------------------------------------------------


def test_first_matching_rule_wins():
    tree = {"a": {"kernel": np.zeros((4, 4))}, "b": {"kernel": np.zeros((4, 4))}}
    rules = [(r"^a/kernel$", P(None, "tensor")), (r"kernel$", P("fsdp")), (r".*", P())]
    assert sharding.partition_specs(tree, rules) == {
        "a": {"kernel": P(None, "tensor")},
        "b": {"kernel": P("fsdp")},
    }


def test_parameter_without_a_rule_is_an_error_naming_its_path():
    tree = {"model": {"adapter": {"kernel": jax.ShapeDtypeStruct((64, 8), jnp.float32)}}}
    with pytest.raises(ValueError, match=r"no partition rule matches parameter 'model/adapter/kernel'"):
        sharding.partition_specs(tree, partitioning.LLAMA_RULES)


def test_spec_longer_than_the_parameter_rank_is_an_error():
    tree = {"bias": np.zeros((4,))}
    with pytest.raises(ValueError, match=r"'bias'.*more entries than the parameter has dimensions"):
        sharding.partition_specs(tree, [(r"bias$", P("fsdp", "tensor"))])


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("kind", ["causal_lm", "reward"])
def test_llama_rules_give_every_parameter_its_documented_spec(kind, scan_layers):
    shapes = jax.eval_shape(init_fn(tiny_config(scan_layers=scan_layers), kind), jax.random.key(0))
    specs = sharding.partition_specs(shapes, partitioning.LLAMA_RULES)
    paths = {path_str(path): spec for path, spec in jax.tree_util.tree_leaves_with_path(specs)}
    assert paths, "the tree has parameters"
    for path, spec in paths.items():
        assert tuple(spec) == expected_spec(path, scan_layers), path


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("kind", ["causal_lm", "reward"])
def test_sharded_parameters_really_are_split_as_their_rule_says(mesh, kind, scan_layers):
    host_params = random_params(tiny_config(scan_layers=scan_layers), kind)
    params = sharding.shard_params(host_params, mesh, partitioning.LLAMA_RULES)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        assert_sharded_as(leaf, path_str(path), expected_spec(path_str(path), scan_layers), mesh)


def test_sharded_init_gives_born_sharded_parameters_equal_to_a_single_device_init(mesh):
    config = tiny_config(scan_layers=True)
    init = init_fn(config, "causal_lm")

    params = sharding.sharded_init(init, jax.random.key(7), mesh=mesh, rules=partitioning.LLAMA_RULES)
    reference = jax.jit(init)(jax.random.key(7))

    leaves = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), expected in zip(leaves, jax.tree.leaves(reference), strict=True):
        name = path_str(path)
        # Each device holds only its 1/(shards) slice: no full-size copy exists anywhere.
        assert_sharded_as(leaf, name, expected_spec(name, scan_layers=True), mesh)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=name)


# ------------------------------------------------------------------------------------------------
# Sharded forward == single-device forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, config_overrides",
    [
        ("causal_lm", {"scan_layers": False}),
        ("causal_lm", {"scan_layers": True}),
        ("causal_lm", {"scan_layers": False, "tie_word_embeddings": True}),
        ("reward", {"scan_layers": False}),
        ("reward", {"scan_layers": True}),
        ("value", {"scan_layers": False}),
        ("value", {"scan_layers": True}),
    ],
    ids=[
        "lm-unrolled",
        "lm-scanned",
        "lm-tied",
        "reward-unrolled",
        "reward-scanned",
        "value-unrolled",
        "value-scanned",
    ],
)
def test_sharded_forward_equals_single_device_forward(mesh, kind, config_overrides):
    config = tiny_config(**config_overrides)
    model = llama.make_model(config, kind)
    host_params = random_params(config, kind)
    batch = left_padded_batch(config.vocab_size)

    expected = jax.jit(model.apply)({"params": host_params}, batch["input_ids"], batch["attention_mask"])

    params = sharding.shard_params(host_params, mesh, partitioning.LLAMA_RULES)
    global_batch = sharding.host_local_to_global(batch, mesh)
    with jax.set_mesh(mesh):
        actual = jax.jit(model.apply)({"params": params}, global_batch["input_ids"], global_batch["attention_mask"])

    assert actual.sharding.spec[0] == sharding.BATCH_AXES  # the batch stayed split over data * fsdp
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Optimizer state
# ------------------------------------------------------------------------------------------------


def test_adamw_state_specs_mirror_the_parameter_specs():
    params = jax.eval_shape(init_fn(tiny_config(scan_layers=True), "causal_lm"), jax.random.key(0))
    optimizer = optax.adamw(1e-3)
    state = jax.eval_shape(optimizer.init, params)

    specs = sharding.optimizer_state_specs(state, params, partitioning.LLAMA_RULES)

    param_specs = sharding.partition_specs(params, partitioning.LLAMA_RULES)
    adam_specs = specs[0]
    assert adam_specs.count == P()
    assert adam_specs.mu == param_specs
    assert adam_specs.nu == param_specs
    assert jax.tree.leaves(specs[1:]) == []  # weight decay and the learning rate keep no state


def test_sharded_optimizer_init_places_moments_like_their_parameters(mesh):
    config = tiny_config(scan_layers=False)
    params = sharding.shard_params(random_params(config, "reward"), mesh, partitioning.LLAMA_RULES)
    optimizer = optax.adamw(1e-3)

    state = sharding.sharded_optimizer_init(optimizer, params, mesh=mesh, rules=partitioning.LLAMA_RULES)

    assert state[0].count.sharding.is_fully_replicated
    for moments in (state[0].mu, state[0].nu):
        for path, leaf in jax.tree_util.tree_leaves_with_path(moments):
            assert_sharded_as(leaf, path_str(path), expected_spec(path_str(path), scan_layers=False), mesh)
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_optimizer_state_that_mirrors_no_parameter_is_an_error():
    params = {"w": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}
    state = {"count": jax.ShapeDtypeStruct((), jnp.int32), "buffer": jax.ShapeDtypeStruct((16,), jnp.float32)}
    with pytest.raises(ValueError, match=r"optimizer state 'buffer' \(shape \(16,\)\) is neither a scalar"):
        sharding.optimizer_state_specs(state, params, [(r"kernel$", P("fsdp"))])


def test_factored_optimizer_state_with_a_different_shape_is_an_error():
    params = {"w": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}
    state = {"v_row": {"w": {"kernel": jax.ShapeDtypeStruct((4,), jnp.float32)}}}
    message = r"'v_row/w/kernel' mirrors parameter 'w/kernel' but has shape \(4,\)"
    with pytest.raises(ValueError, match=message):
        sharding.optimizer_state_specs(state, params, [(r"kernel$", P("fsdp"))])


# ------------------------------------------------------------------------------------------------
# Batches and activations
# ------------------------------------------------------------------------------------------------


def test_batch_that_does_not_split_over_data_and_fsdp_names_the_config_key(mesh):
    sharding.check_batch_fits_mesh(8, mesh)
    message = r"ppo\.mini_batch_size=6 is not divisible by mesh\.data \* mesh\.fsdp = 2 \* 2 = 4"
    with pytest.raises(ValueError, match=message):
        sharding.check_batch_fits_mesh(6, mesh, name="ppo.mini_batch_size")


def test_host_local_batch_becomes_a_global_array_split_over_the_batch_axes(mesh):
    tokens = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)

    batch = sharding.host_local_to_global({"tokens": tokens}, mesh)

    assert batch["tokens"].sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)
    for shard in batch["tokens"].addressable_shards:
        np.testing.assert_array_equal(shard.data, tokens[shard.index])
        assert shard.data.shape == (2, 3)


def test_host_local_batch_that_does_not_split_is_an_error(mesh):
    with pytest.raises(ValueError, match=r"batch entry 'tokens'.*=6 is not divisible"):
        sharding.host_local_to_global({"tokens": np.zeros((6, 3), np.int32)}, mesh)


def test_constrain_pins_activations_under_set_mesh(mesh):
    x = jnp.ones((8, 4, 6))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: sharding.constrain(a * 2, P(sharding.BATCH_AXES, None, "tensor")))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
    np.testing.assert_array_equal(np.asarray(y), 2.0)


def test_constrain_leaves_dimensions_the_mesh_does_not_divide_unconstrained(mesh):
    x = jnp.ones((2, 4, 6))  # a batch of 2 cannot be split 4 ways over data * fsdp
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: sharding.constrain(a * 2, P(sharding.BATCH_AXES, None, "tensor")))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "tensor")), 3)


def test_constrain_without_a_mesh_is_the_identity():
    x = jnp.ones((8, 4))
    assert sharding.constrain(x, P(sharding.BATCH_AXES)) is x
