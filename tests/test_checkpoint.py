"""Specification of easyppo.weights.run_checkpoint: sharded save/restore across meshes, retention, refusal, errors."""

import json
import math
import os
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easyppo.weights import run_checkpoint, run_directory

AUTO = jax.sharding.AxisType.Auto

# Parameter name -> partition spec, on the (data, fsdp, tensor) save mesh and the (data, fsdp) restore mesh.
SAVE_SPECS = {"embed": P(("data", "fsdp"), "tensor"), "w": P("fsdp", "tensor"), "b": P()}
RESTORE_SPECS = {"embed": P("data", "fsdp"), "w": P("fsdp", None), "b": P("data")}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    kl_coef: jax.Array


def make_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape), devices=jax.devices()[: math.prod(shape)])


def sharding_for(mesh, specs):
    """Params (and the Adam moments named after them) by name; every other leaf replicated."""

    def pick(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return NamedSharding(mesh, specs.get(name, P()))

    return pick


def make_state(mesh) -> TrainState:
    """A small train state like the one the train loop checkpoints, sharded over `mesh`."""
    values = {
        "embed": np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 7.0,
        "w": np.linspace(-1.0, 1.0, 32, dtype=np.float32).reshape(8, 4),
        "b": np.array([0.5, -0.25, 2.0, 3.0], dtype=np.float32),
    }
    params = {name: jax.device_put(v, NamedSharding(mesh, SAVE_SPECS[name])) for name, v in values.items()}
    optimizer = optax.adam(0.1)
    opt_state = optimizer.init(params)
    _, opt_state = optimizer.update(jax.tree.map(lambda p: 0.5 * p, params), opt_state, params)
    replicated = NamedSharding(mesh, P())
    return TrainState(
        step=jax.device_put(jnp.int32(7), replicated),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(jax.random.key(3)), replicated),
        kl_coef=jax.device_put(jnp.float32(0.05), replicated),
    )


def abstract_on(state, mesh, specs, dtype=None):
    pick = sharding_for(mesh, specs)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=pick(path, x)), state
    )


def host_copy(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), e)


def ckpt_config(directory, **overrides):
    config = run_checkpoint.default_config()
    config.directory = str(directory)
    config.save_every_steps = 1
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def save_mesh():
    return make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))


@pytest.fixture(scope="module")
def state(save_mesh):
    return make_state(save_mesh)


@pytest.fixture
def saved(tmp_path, state):
    """A directory holding step 7 of `state`; yields (directory, host copy of the saved state)."""
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path), run_config={"lr": 0.1}) as ckpt:
        assert ckpt.save(7, state, {"epoch": 1, "batches_consumed": 12})
    return tmp_path, host_copy(state)


def test_default_config_has_the_documented_keys():
    config = run_checkpoint.default_config()
    assert set(config.keys()) == {"directory", "save_every_steps", "max_to_keep", "async_save", "digests"}
    assert config.async_save is True and config.digests is True


@pytest.mark.parametrize("async_save", [True, False])
def test_state_saved_on_2x2x2_mesh_restores_onto_4x2_mesh_unchanged(tmp_path, save_mesh, state, async_save):
    new_mesh = make_mesh((4, 2), ("data", "fsdp"))
    target = abstract_on(state, new_mesh, RESTORE_SPECS)
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path, async_save=async_save)) as ckpt:
        ckpt.save(7, state)
        ckpt.wait_until_finished()
        restored, _, _ = ckpt.restore(target)
    assert_trees_equal(restored, host_copy(state))
    assert restored.params["embed"].sharding == NamedSharding(new_mesh, P("data", "fsdp"))
    assert restored.opt_state[0].mu["w"].sharding == NamedSharding(new_mesh, P("fsdp", None))


def test_arrays_may_be_donated_as_soon_as_an_async_save_returns(tmp_path, save_mesh):
    state = make_state(save_mesh)
    expected = host_copy(state)
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path, async_save=True)) as ckpt:
        ckpt.save(1, state)
        for leaf in jax.tree.leaves(state):  # what buffer donation in the next train step does
            leaf.delete()
        ckpt.wait_until_finished()
        restored, _, _ = ckpt.restore(abstract_on(expected, make_mesh((1,), ("data",)), {}))
    assert_trees_equal(restored, expected)


def test_state_restores_onto_a_single_device(saved, state):
    directory, expected = saved
    one_device = make_mesh((1,), ("data",))
    target = abstract_on(state, one_device, {})
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        restored, _, _ = ckpt.restore(target)
    assert_trees_equal(restored, expected)
    assert restored.params["w"].sharding.device_set == {jax.devices()[0]}


def test_restore_returns_the_target_tree_types(saved, state):
    directory, _ = saved
    target = abstract_on(state, make_mesh((4, 2), ("data", "fsdp")), RESTORE_SPECS)
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        restored, _, _ = ckpt.restore(target)
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)


def test_restore_casts_to_the_target_dtype(saved, state):
    directory, expected = saved
    target = abstract_on(state.params, make_mesh((4, 2), ("data", "fsdp")), RESTORE_SPECS, dtype=jnp.bfloat16)
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        params = ckpt.restore_subtree({"params": target})["params"]
    assert params["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["embed"]), expected.params["embed"].astype(jnp.bfloat16))


def test_data_state_and_metadata_round_trip(tmp_path, state):
    run_config = ml_collections.ConfigDict({"model": {"preset": "tiny", "mesh": (2, 2, 2)}, "lr": 1e-5})
    data_state = {"seed": 3, "epoch": 2, "batches_consumed": 41, "shard": [0, 4]}
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path), run_config=run_config) as ckpt:
        before = time.time()
        ckpt.save(9, state, data_state)
        ckpt.wait_until_finished()
        after = time.time()
        _, restored_data_state, metadata = ckpt.restore(abstract_on(state, make_mesh((1,), ("data",)), {}))
    assert restored_data_state == data_state
    assert metadata["step"] == 9
    assert metadata["config"] == {"model": {"preset": "tiny", "mesh": [2, 2, 2]}, "lr": 1e-5}
    assert metadata["versions"]["jax"] == jax.__version__
    assert metadata["topology"]["device_count"] == jax.device_count()
    assert before <= metadata["wall_time"] <= after


def test_resolved_config_is_written_as_config_json_inside_each_step(tmp_path, state):
    run_config = ml_collections.ConfigDict({"algorithm": "dpo", "beta": 0.1, "stages": ("sft", "dpo")})
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path), run_config=run_config) as ckpt:
        ckpt.save(5, state)
    with open(os.path.join(tmp_path, "5", "config", "config.json"), encoding="utf-8") as f:
        assert json.load(f) == {"algorithm": "dpo", "beta": 0.1, "stages": ["sft", "dpo"]}


def test_saves_only_at_multiples_of_save_every_steps_unless_forced(tmp_path, state):
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path, save_every_steps=2)) as ckpt:
        decisions = [ckpt.save(step, state) for step in (1, 2, 3)]
        forced = ckpt.save(5, state, force=True)
        ckpt.wait_until_finished()
        assert decisions == [False, True, False]
        assert forced
        assert ckpt.all_steps() == [2, 5]


def test_keeps_only_the_newest_max_to_keep_checkpoints(tmp_path, state):
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path, max_to_keep=2)) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3]
    assert sorted(name for name in os.listdir(tmp_path) if name.isdigit()) == ["2", "3"]


def test_max_to_keep_zero_keeps_every_checkpoint(tmp_path, state):
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path, max_to_keep=0)) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2, 3, 4]


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_refused_and_earlier_checkpoints_stay_intact(saved, state, bad_value):
    directory, expected = saved
    bad_w = state.params["w"].at[3, 1].set(bad_value)
    bad_state = state.replace(params={**state.params, "w": bad_w})
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        with pytest.raises(
            run_checkpoint.NonFiniteStateError, match="'params/w'. The latest good checkpoint is step 7"
        ):
            ckpt.save(8, bad_state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [7]
        restored, _, _ = ckpt.restore(abstract_on(state, make_mesh((1,), ("data",)), {}))
    assert sorted(os.listdir(directory)) == ["7"]
    assert_trees_equal(restored, expected)


def test_non_finite_optimizer_state_is_refused(tmp_path, state):
    mu = state.opt_state[0].mu
    bad_adam = state.opt_state[0]._replace(mu={**mu, "b": mu["b"].at[0].set(jnp.nan)})
    bad_state = state.replace(opt_state=(bad_adam, *state.opt_state[1:]))
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path)) as ckpt:
        with pytest.raises(
            run_checkpoint.NonFiniteStateError, match="'opt_state/0/mu/b'. No earlier checkpoint exists"
        ):
            ckpt.save(1, bad_state)
        assert ckpt.latest_step() is None


def test_partial_restore_reads_only_the_params(saved, state):
    directory, expected = saved
    target = {"params": abstract_on(state.params, make_mesh((4, 2), ("data", "fsdp")), RESTORE_SPECS)}
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        restored = ckpt.restore_subtree(target)
    assert list(restored) == ["params"]
    assert_trees_equal(restored["params"], expected.params)


def test_module_restore_subtree_reads_another_run_without_touching_it(saved, state):
    directory, expected = saved
    leftover = os.path.join(directory, "9.orbax-checkpoint-tmp")  # another run may still be writing it
    os.makedirs(leftover)
    target = {"params": abstract_on(state.params, make_mesh((1,), ("data",)), {})}
    restored = run_directory.restore_subtree(directory, target)
    assert_trees_equal(restored["params"], expected.params)
    assert os.path.isdir(leftover)


def _simulate_crash_before_finalisation(directory, step):
    """What a crash mid-save leaves behind: complete-looking files in the unrenamed tmp directory."""
    step_dir = os.path.join(directory, str(step))
    os.remove(os.path.join(step_dir, "commit_success.txt"))
    os.rename(step_dir, os.path.join(directory, f"{step}.orbax-checkpoint-tmp"))


def test_partial_tmp_directory_is_not_taken_as_latest_checkpoint(tmp_path, state):
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path)) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, jax.tree.map(lambda x: x * 2 if jnp.issubdtype(x.dtype, jnp.floating) else x, state))
    _simulate_crash_before_finalisation(tmp_path, 2)
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 1
        restored, _, metadata = ckpt.restore(abstract_on(state, make_mesh((1,), ("data",)), {}))
    assert metadata["step"] == 1
    assert_trees_equal(restored, host_copy(state))


def test_step_of_a_crashed_save_can_be_saved_again(tmp_path, state):
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path)) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    _simulate_crash_before_finalisation(tmp_path, 2)
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path)) as ckpt:
        assert ckpt.save(2, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_partial_directories_left_by_a_crash_are_deleted_by_the_next_writer(tmp_path, state):
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path)) as ckpt:
        ckpt.save(1, state)
        ckpt.save(9, state)
    _simulate_crash_before_finalisation(tmp_path, 9)
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path)) as ckpt:
        ckpt.save(2, state)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_restore_from_a_directory_without_checkpoints_is_a_clear_error(tmp_path, state):
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path)) as ckpt:
        with pytest.raises(FileNotFoundError, match="No finalised checkpoint in .*"):
            ckpt.restore(abstract_on(state, make_mesh((1,), ("data",)), {}))


def test_restore_of_an_absent_step_lists_the_available_steps(saved, state):
    directory, _ = saved
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        with pytest.raises(FileNotFoundError, match=r"step 3 .*available steps: \[7\]"):
            ckpt.restore(abstract_on(state, make_mesh((1,), ("data",)), {}), step=3)


def test_restore_target_with_a_key_the_checkpoint_lacks_names_that_key(saved, state):
    directory, _ = saved
    target = abstract_on(state, make_mesh((1,), ("data",)), {})
    target = target.replace(params={**target.params, "lm_head": target.params["w"]})
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        with pytest.raises(run_checkpoint.TreeMismatchError, match="'params/lm_head' is not in checkpoint step 7"):
            ckpt.restore(target)


def test_restore_target_lacking_a_stored_key_names_the_stored_key(saved, state):
    directory, _ = saved
    target = abstract_on(state, make_mesh((1,), ("data",)), {})
    target = target.replace(params={k: v for k, v in target.params.items() if k != "b"})
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        with pytest.raises(
            run_checkpoint.TreeMismatchError, match="holds key 'params/b' that the restore target lacks"
        ):
            ckpt.restore(target)


def test_restore_target_with_a_wrong_shape_names_key_and_both_shapes(saved, state):
    directory, _ = saved
    target = abstract_on(state.params, make_mesh((1,), ("data",)), {})
    target["w"] = jax.ShapeDtypeStruct((8, 5), jnp.float32, sharding=target["w"].sharding)
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        with pytest.raises(run_checkpoint.TreeMismatchError, match=r"'params/w' has shape \(8, 5\) .* shape \(8, 4\)"):
            ckpt.restore_subtree({"params": target})


def test_restore_target_without_shardings_is_refused(saved, state):
    directory, _ = saved
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)}
    with run_checkpoint.Checkpointer(ckpt_config(directory)) as ckpt:
        with pytest.raises(ValueError, match="'params/b' has no sharding"):
            ckpt.restore_subtree(target)


def test_data_state_that_is_not_json_is_refused_before_writing(tmp_path, state):
    with run_checkpoint.Checkpointer(ckpt_config(tmp_path)) as ckpt:
        with pytest.raises(TypeError, match="data_state is not JSON-serialisable"):
            ckpt.save(1, state, {"order": np.arange(3)})
        assert ckpt.latest_step() is None


def test_run_config_that_is_not_json_names_the_key():
    with pytest.raises(TypeError, match="'model.dtype'"):
        run_checkpoint.Checkpointer(ckpt_config("/nonexistent"), run_config={"model": {"dtype": jnp.bfloat16}})


def test_unset_directory_is_a_clear_error():
    with pytest.raises(ValueError, match="checkpoint.directory: is not set"):
        run_checkpoint.Checkpointer(run_checkpoint.default_config())


def test_a_read_only_checkpointer_refuses_to_save(saved, state):
    directory, _ = saved
    with run_checkpoint.Checkpointer(ckpt_config(directory), read_only=True) as ckpt:
        with pytest.raises(ValueError, match="read-only; it cannot save"):
            ckpt.save(8, state, force=True)
    assert sorted(os.listdir(directory)) == ["7"]
