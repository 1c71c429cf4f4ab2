"""Specification of easyppo.core.grad_accum: accumulated gradients equal the whole-batch gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easyppo.core.grad_accum import accumulate_gradients, all_finite, gradient_update

VOCAB, DIM, BATCH, SEQ = 11, 4, 8, 6
# Loss-token counts per row vary from 0 to 5, so every way of splitting the batch gives microbatches
# with different token counts (and a mean of per-microbatch means would be wrong).
LENGTHS = np.array([5, 1, 4, 0, 2, 5, 3, 1])


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "embed": rng.normal(size=(VOCAB, DIM)).astype(np.float32),
        "out": rng.normal(size=(DIM, VOCAB)).astype(np.float32),
    }
    tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
    targets = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
    mask = (np.arange(SEQ)[None, :] < LENGTHS[:, None]).astype(np.float32)
    return params, {"tokens": tokens, "targets": targets, "mask": mask}


def token_nll_and_logits(params, batch):
    hidden = jnp.tanh(params["embed"][batch["tokens"]])
    logits = hidden @ params["out"]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    return nll, logits


def sft_like_loss(params, batch, rng):
    """Summed token NLL over the mask, reported as (sum, count) pairs."""
    del rng
    nll, logits = token_nll_and_logits(params, batch)
    mask = batch["mask"]
    loss_sum = jnp.sum(nll * mask)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    metrics = {
        "loss": (loss_sum, jnp.sum(mask)),
        "accuracy": (jnp.sum(correct * mask), jnp.sum(mask)),
        "sequences": (jnp.sum(jnp.any(mask > 0, -1)), jnp.asarray(batch["mask"].shape[0])),
    }
    return loss_sum, metrics


def whole_batch_mean_loss(params, batch):
    nll, _ = token_nll_and_logits(params, batch)
    return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])


whole_batch_mean_grad = jax.jit(jax.grad(whole_batch_mean_loss))


def numpy_token_stats(params, batch):
    hidden = np.tanh(params["embed"][batch["tokens"]].astype(np.float64))
    logits = hidden @ params["out"]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    correct = logits.argmax(-1) == batch["targets"]
    selected = batch["mask"] > 0
    return nll[selected].mean(), correct[selected].mean()


def accumulate(num_microbatches, loss_fn=sft_like_loss):
    @functools.partial(jax.jit, static_argnums=0)
    def run(m, params, batch, rng):
        return accumulate_gradients(loss_fn, params, batch, rng, m)

    return functools.partial(run, num_microbatches)


@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
def test_gradients_equal_the_whole_batch_token_mean_gradient(num_microbatches):
    params, batch = make_problem()
    expected = whole_batch_mean_grad(params, batch)

    grads, _ = accumulate(num_microbatches)(params, batch, jax.random.key(0))

    for name in params:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_mean_of_microbatch_means_would_differ_on_this_problem():
    """Guards the test above: with these masks, the wrong way of averaging gives other numbers."""
    params, batch = make_problem()
    halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
    mean_of_means = jax.tree.map(lambda a, b: (a + b) / 2, *[whole_batch_mean_grad(params, h) for h in halves])
    expected = whole_batch_mean_grad(params, batch)

    assert not np.allclose(mean_of_means["out"], expected["out"], rtol=1e-3)


@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
def test_metric_means_are_global_sums_over_global_counts(num_microbatches):
    params, batch = make_problem()
    expected_loss, expected_accuracy = numpy_token_stats(params, batch)

    _, metrics = accumulate(num_microbatches)(params, batch, jax.random.key(0))

    assert set(metrics) == {"loss", "accuracy", "sequences"}
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(expected_accuracy, rel=1e-6)
    assert float(metrics["sequences"]) == pytest.approx(np.mean(LENGTHS > 0))


def test_each_microbatch_gets_rng_folded_with_its_index():
    def noise_loss(params, batch, rng):
        loss_sum = jnp.sum(params["w"] * batch["x"])
        return loss_sum, {"loss": (loss_sum, 1.0), "noise": (jax.random.uniform(rng), 1.0)}

    rng = jax.random.key(3)
    draws = np.asarray(jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(jnp.arange(4)))

    _, metrics = accumulate(4, noise_loss)({"w": jnp.ones(())}, {"x": jnp.ones(8)}, rng)

    assert len(set(draws.tolist())) == 4
    assert float(metrics["noise"]) == pytest.approx(draws.mean(), rel=1e-6)


def test_batch_sharded_over_devices_is_split_without_gathering_rows():
    if jax.device_count() < 8:
        pytest.skip("needs the 8-device emulated mesh from conftest.py")
    params, batch = make_problem()
    batch = jax.tree.map(lambda x: np.concatenate([x] * 4), batch)  # 32 rows: 4 per device
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded_batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    step = jax.jit(lambda p, b, r: accumulate_gradients(sft_like_loss, p, b, r, 4))

    grads, _ = step(params, sharded_batch, jax.random.key(0))
    compiled_hlo = step.lower(params, sharded_batch, jax.random.key(0)).compile().as_text()

    expected = whole_batch_mean_grad(params, batch)
    for name in params:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Every microbatch already has one row on every device; contiguous slices would all-gather.
    assert "all-gather" not in compiled_hlo and "all-to-all" not in compiled_hlo


def test_single_microbatch_does_not_scan_and_several_scan_once():
    params, batch = make_problem()

    def scans(m):
        jaxpr = jax.make_jaxpr(lambda p, b, r: accumulate_gradients(sft_like_loss, p, b, r, m))(
            params, batch, jax.random.key(0)
        )
        return [eqn.params["length"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]

    assert scans(1) == []
    assert scans(4) == [4]


def test_zero_loss_tokens_give_zero_gradients_and_metrics_not_nan():
    params, batch = make_problem()
    batch["mask"] = np.zeros_like(batch["mask"])

    grads, metrics = accumulate(2)(params, batch, jax.random.key(0))

    for leaf in jax.tree.leaves((grads, metrics)):
        assert np.all(np.asarray(leaf) == 0)


def test_batch_not_divisible_by_microbatches_is_a_clear_error():
    params, batch = make_problem()
    batch = jax.tree.map(lambda x: x[:6], batch)

    with pytest.raises(ValueError, match="batch size 6 is not divisible by num_microbatches=4"):
        accumulate_gradients(sft_like_loss, params, batch, jax.random.key(0), 4)


def test_batch_arrays_with_different_leading_sizes_are_a_clear_error():
    params, batch = make_problem()
    batch["mask"] = batch["mask"][:4]

    with pytest.raises(ValueError, match=r"same leading batch axis.*\['mask'\]"):
        accumulate_gradients(sft_like_loss, params, batch, jax.random.key(0), 2)


def test_loss_fn_without_a_loss_pair_is_a_clear_error():
    def bad_loss(params, batch, rng):
        loss_sum = jnp.sum(params["w"] * batch["x"])
        return loss_sum, {"nll": (loss_sum, 1.0)}

    for m in (1, 2):
        with pytest.raises(ValueError, match="'loss': \\(loss_sum, loss_count\\)"):
            accumulate_gradients(bad_loss, {"w": jnp.ones(())}, {"x": jnp.ones(4)}, jax.random.key(0), m)


# ------------------------------------------------------------------------- the guarded update


def huge_loss(params, batch, rng):
    """The problem's loss times 1e15: the loss, every gradient and their norm are still finite in float32."""
    loss_sum, metrics = sft_like_loss(params, batch, rng)
    return loss_sum * 1e15, {**metrics, "loss": (metrics["loss"][0] * 1e15, metrics["loss"][1])}


def _guarded_step(loss_fn, optimizer):
    params, batch = make_problem(1)
    opt_state = optimizer.init(params)
    update = jax.jit(lambda p, s: gradient_update(loss_fn, optimizer, p, s, batch, jax.random.key(0), 2))(
        params, opt_state
    )
    return params, opt_state, update


def test_an_update_that_overflows_the_parameters_is_discarded_like_a_non_finite_gradient():
    # 1e15-sized gradients times a learning rate of 1e30 overflow float32: the parameters would be inf.
    params, opt_state, update = _guarded_step(huge_loss, optax.sgd(1e30))
    assert np.isfinite(float(update.metrics["loss"])) and np.isfinite(float(update.grad_norm))
    assert not bool(update.finite)
    jax.tree.map(np.testing.assert_array_equal, update.params, params)
    jax.tree.map(np.testing.assert_array_equal, update.opt_state, opt_state)


def test_an_ordinary_update_is_applied():
    params, _, update = _guarded_step(sft_like_loss, optax.adam(1e-2))
    assert bool(update.finite)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), update.params, params)))


def test_all_finite_looks_at_every_floating_leaf_and_ignores_integers():
    assert bool(all_finite({"a": jnp.ones(3), "count": jnp.int32(7)}))
    assert not bool(all_finite({"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.inf])}}))
    assert not bool(all_finite([jnp.array(jnp.nan, jnp.bfloat16)]))
