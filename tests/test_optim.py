"""Specification of easyppo.core.optim: schedules by hand formula, AdamW + clipping against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyppo.core import optim

PEAK = 1e-3


def config(**overrides):
    cfg = optim.default_config()
    cfg.learning_rate = PEAK
    cfg.update(overrides)
    return cfg


def lr_at(schedule, step):
    return float(schedule(step))


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


def test_linear_schedule_warms_up_then_decays_linearly_to_the_end_ratio():
    schedule = optim.make_schedule(config(schedule="linear", warmup_steps=10, end_lr_ratio=0.1), total_steps=100)
    end = 0.1 * PEAK

    expected = {
        0: 0.0,
        5: PEAK * 5 / 10,
        10: PEAK,
        55: PEAK + (end - PEAK) * 45 / 90,
        100: end,
        150: end,
    }
    for step, lr in expected.items():
        assert lr_at(schedule, step) == pytest.approx(lr, rel=1e-5, abs=1e-12), step


def test_cosine_schedule_warms_up_then_follows_half_a_cosine_to_the_end_ratio():
    schedule = optim.make_schedule(config(schedule="cosine", warmup_steps=10, end_lr_ratio=0.1), total_steps=100)
    end = 0.1 * PEAK

    def cosine(step):
        return end + (PEAK - end) * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))

    expected = {
        0: 0.0,
        4: PEAK * 4 / 10,
        10: PEAK,
        40: cosine(40),
        55: cosine(55),
        100: end,
        120: end,
    }
    for step, lr in expected.items():
        assert lr_at(schedule, step) == pytest.approx(lr, rel=1e-5, abs=1e-12), step


def test_constant_schedule_holds_the_peak_after_warmup():
    schedule = optim.make_schedule(config(schedule="constant", warmup_steps=4), total_steps=20)

    assert lr_at(schedule, 2) == pytest.approx(PEAK / 2)
    for step in (4, 10, 20, 30):
        assert lr_at(schedule, step) == pytest.approx(PEAK)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_every_schedule_returns_a_float32_array_with_and_without_warmup(schedule):
    # optax's constant schedule alone returns a Python float, which a trainer logging
    # ``schedule(step).astype(...)`` tripped over.
    for warmup in (None, 2):
        value = optim.make_schedule(config(schedule=schedule, warmup_steps=warmup), total_steps=10)(5)
        assert isinstance(value, jax.Array) and value.dtype == jnp.float32


def test_no_warmup_starts_at_the_peak():
    schedule = optim.make_schedule(config(schedule="linear"), total_steps=10)

    assert lr_at(schedule, 0) == pytest.approx(PEAK)
    assert lr_at(schedule, 5) == pytest.approx(PEAK / 2)


@pytest.mark.parametrize(
    "ratio, total_steps, expected_warmup", [(0.1, 50, 5), (0.1, 30, 3), (0.05, 30, 2), (0.0, 30, 0)]
)
def test_warmup_ratio_is_a_fraction_of_total_steps_rounded_up(ratio, total_steps, expected_warmup):
    cfg = config(schedule="constant", warmup_ratio=ratio)
    schedule = optim.make_schedule(cfg, total_steps)

    assert optim.warmup_steps(cfg, total_steps) == expected_warmup
    if expected_warmup:
        assert lr_at(schedule, expected_warmup - 1) == pytest.approx(PEAK * (expected_warmup - 1) / expected_warmup)
    assert lr_at(schedule, expected_warmup) == pytest.approx(PEAK)


def test_setting_both_warmup_steps_and_ratio_is_an_error_naming_both_keys():
    with pytest.raises(ValueError, match=r"warmup_steps=3 and warmup_ratio=0\.1"):
        optim.make_schedule(config(warmup_steps=3, warmup_ratio=0.1), total_steps=10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"schedule": "exponential"}, "optim.schedule: 'exponential' is not one of"),
        ({"warmup_steps": 11}, "optim.warmup_steps: must be in"),
        ({"warmup_ratio": 1.5}, "optim.warmup_ratio: must be in"),
        ({"learning_rate": -1.0}, "optim.learning_rate: must be >= 0"),
        ({"end_lr_ratio": -0.5}, "optim.end_lr_ratio: must be >= 0"),
    ],
)
def test_bad_schedule_config_is_an_error_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        optim.make_schedule(config(**overrides), total_steps=10)


# ------------------------------------------------------------------------------------------------
# Weight decay mask
# ------------------------------------------------------------------------------------------------


def llama_like_params(scan_layers: bool, vocab=7, dim=4, ffn=6, heads=2, kv_heads=1, head_dim=2, layers=2):
    """A parameter tree with the model contract's layout (see the shared brief)."""

    def block(lead=()):
        z = lambda *shape: jnp.zeros(lead + shape)
        return {
            "input_layernorm": {"scale": z(dim)},
            "self_attn": {
                "q_proj": {"kernel": z(dim, heads * head_dim)},
                "k_proj": {"kernel": z(dim, kv_heads * head_dim)},
                "v_proj": {"kernel": z(dim, kv_heads * head_dim)},
                "o_proj": {"kernel": z(heads * head_dim, dim)},
            },
            "post_attention_layernorm": {"scale": z(dim)},
            "mlp": {
                "gate_proj": {"kernel": z(dim, ffn)},
                "up_proj": {"kernel": z(dim, ffn)},
                "down_proj": {"kernel": z(ffn, dim)},
            },
        }

    model = {
        "embed_tokens": {"embedding": jnp.zeros((vocab, dim))},
        "norm": {"scale": jnp.zeros(dim)},
    }
    if scan_layers:
        model["layers"] = block(lead=(layers,))
    else:
        model.update({f"layers_{i}": block() for i in range(layers)})
    return {
        "model": model,
        "lm_head": {"kernel": jnp.zeros((dim, vocab))},
        "score": {"kernel": jnp.zeros((dim, 1))},
    }


def expected_decay(path) -> bool:
    names = [p.key for p in path]
    return names[-1] in ("kernel", "embedding")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_mask_decays_matrices_but_not_norm_scales(scan_layers):
    params = llama_like_params(scan_layers)

    mask = optim.weight_decay_mask(params)

    flat_mask = jax.tree_util.tree_flatten_with_path(mask)[0]
    assert flat_mask, "empty tree"
    for path, decays in flat_mask:
        assert decays == expected_decay(path), jax.tree_util.keystr(path)


def test_weight_decay_mask_skips_any_one_dimensional_parameter():
    params = {"kernel": jnp.zeros((3, 2)), "gain": jnp.zeros(3), "temperature": jnp.zeros(())}

    assert optim.weight_decay_mask(params) == {"kernel": True, "gain": False, "temperature": False}


def test_optimizer_state_can_be_shaped_without_arrays():
    params = jax.eval_shape(lambda: llama_like_params(scan_layers=True))
    optimizer = optim.make_optimizer(config(weight_decay=0.1), total_steps=10)

    state = jax.eval_shape(optimizer.init, params)

    assert len(jax.tree.leaves(state)) > len(jax.tree.leaves(params))


def test_weight_decay_shrinks_matrices_and_leaves_scales_alone():
    params = jax.tree.map(lambda x: jnp.ones_like(x) * 2.0, llama_like_params(scan_layers=False))
    optimizer = optim.make_optimizer(config(schedule="constant", weight_decay=0.1), total_steps=10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    updates, _ = jax.jit(optimizer.update)(zero_grads, optimizer.init(params), params)

    for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
        expected = -PEAK * 0.1 * 2.0 if expected_decay(path) else 0.0
        np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------
# AdamW with clipping against a NumPy reference
# ------------------------------------------------------------------------------------------------


def numpy_adamw_updates(grads_per_step, params, lr_per_step, b1, b2, eps, weight_decay, decay, clip):
    """Textbook AdamW (bias-corrected, decoupled decay) after optional global-norm clipping."""
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    params = {k: v.astype(np.float64) for k, v in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lr_per_step, strict=True), start=1):
        norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
        scale = min(1.0, clip / norm) if clip else 1.0
        for k, g in grads.items():
            g = g * scale
            mu[k] = b1 * mu[k] + (1 - b1) * g
            nu[k] = b2 * nu[k] + (1 - b2) * g**2
            direction = (mu[k] / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps)
            if decay[k]:
                direction = direction + weight_decay * params[k]
            params[k] = params[k] - lr * direction
    return params


def run_optimizer(cfg, grads_per_step, params, total_steps):
    optimizer = optim.make_optimizer(cfg, total_steps)
    state = optimizer.init(params)
    step = jax.jit(optimizer.update)
    for grads in grads_per_step:
        updates, state = step(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params


def adam_problem():
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(3, 4)).astype(np.float32),
        "scale": rng.normal(size=4).astype(np.float32),
    }
    # Gradient norms 100, 0.5, 20: clipping at 1 rescales the first and the last step only, which
    # changes Adam's moments (a single clipped step would not show: Adam is scale-invariant).
    grads_per_step = []
    for norm in (100.0, 0.5, 20.0):
        g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        g_norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        grads_per_step.append({k: x * norm / g_norm for k, x in g.items()})
    return params, grads_per_step


@pytest.mark.parametrize("clip", [1.0, 0.0, None])
def test_optimizer_is_clipped_adamw_on_the_schedule(clip):
    params, grads_per_step = adam_problem()
    cfg = config(
        schedule="linear",
        warmup_steps=1,
        b1=0.8,
        b2=0.9,
        eps=1e-6,
        weight_decay=0.2,
        clip_grad_norm=clip,
    )
    total_steps = 4
    schedule = optim.make_schedule(cfg, total_steps)
    lrs = [lr_at(schedule, s) for s in range(len(grads_per_step))]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(PEAK)

    got = run_optimizer(cfg, grads_per_step, params, total_steps)

    expected = numpy_adamw_updates(
        grads_per_step, params, lrs, 0.8, 0.9, 1e-6, 0.2, {"kernel": True, "scale": False}, clip
    )
    for k in params:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_clipping_changes_the_result_when_gradient_norms_vary():
    params, grads_per_step = adam_problem()
    clipped = run_optimizer(config(clip_grad_norm=1.0), grads_per_step, params, total_steps=4)
    unclipped = run_optimizer(config(clip_grad_norm=0.0), grads_per_step, params, total_steps=4)

    assert not np.allclose(clipped["kernel"], unclipped["kernel"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"b2": 1.0}, "optim.b2: must be in"),
        ({"weight_decay": -0.1}, "optim.weight_decay: must be"),
        ({"clip_grad_norm": -1.0}, "optim.clip_grad_norm: must be"),
    ],
)
def test_bad_optimizer_config_is_an_error_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(config(**overrides), total_steps=10)
