"""Loss windows: the LM head projects only the positions a loss reads, with unchanged results.

The batcher picks one width per global batch from a few buckets; each row's window covers all of its
scored positions. The losses computed on windows must equal independent full-softmax formulas.
"""

import jax
import numpy as np
import pytest
from helpers.demo_data import DEMO_DATA

from easyppo.algorithms import sft
from easyppo.core import ops
from easyppo.data import pipeline, windows
from easyppo.data.errors import DataConfigError
from easyppo.models import llama

PAD = 0
TINY = llama.get_preset("tiny", num_hidden_layers=1, pad_token_id=PAD)


def test_widths_are_multiples_of_64_up_to_the_full_width():
    assert windows.window_widths(256, 4) == (64, 128, 192, 256)
    assert windows.window_widths(4096, 4) == (1024, 2048, 3072, 4096)
    assert windows.window_widths(100, 4) == (64, 100)
    assert windows.window_widths(64, 4) == (64,)
    assert windows.window_widths(256, 1) == (256,)


def test_the_smallest_covering_width_is_picked():
    widths = (64, 128, 192, 256)
    assert windows.pick_width(np.array([3, 64, 10]), widths) == 64
    assert windows.pick_width(np.array([65]), widths) == 128
    assert windows.pick_width(np.array([0, 0]), widths) == 64
    with pytest.raises(ValueError, match="more than the widest window 256"):
        windows.pick_width(np.array([257]), widths)


def test_ragged_spans_run_from_first_to_last_scored_token():
    values = np.array([0, 1, 1, 0, 1, 0, 0, 0, 1])
    offsets = np.array([0, 5, 7, 9])  # rows: [0 1 1 0 1], [0 0], [0 1]
    assert windows.ragged_spans(values, offsets).tolist() == [4, 0, 1]


def random_sft_rows(seed, *, rows=5, seq_len=40):
    """Right-padded rows with several scored turns (gaps between them) and random lengths."""
    rng = np.random.default_rng(seed)
    ids = np.full((rows, seq_len), PAD, np.int32)
    attention = np.zeros((rows, seq_len), np.int32)
    loss = np.zeros((rows, seq_len), np.int32)
    for row in range(rows):
        length = int(rng.integers(8, seq_len + 1))
        ids[row, :length] = rng.integers(4, TINY.vocab_size, length)
        attention[row, :length] = 1
        for start in sorted(rng.choice(np.arange(1, length), size=2, replace=False)):
            loss[row, start : min(length, start + int(rng.integers(1, 6)))] = 1
    loss[-1] = 0  # a filler row: nothing scored
    return ids, attention, loss


@pytest.mark.parametrize("seed", range(4))
def test_a_window_holds_every_scored_target_of_its_row(seed):
    ids, _, loss = random_sft_rows(seed)
    spans = [np.flatnonzero(row) for row in loss]
    width = max(int(s[-1] - s[0] + 1) if len(s) else 0 for s in spans)
    window = windows.target_window(ids, loss, width)
    full_targets, full_mask = (np.asarray(x) for x in ops.shift_for_next_token(ids, loss))
    for row in range(len(ids)):
        columns = window["window_start"][row] + np.arange(width)
        assert columns[0] >= 0 and columns[-1] < ids.shape[1]
        np.testing.assert_array_equal(window["window_targets"][row], full_targets[row, columns])
        np.testing.assert_array_equal(window["window_mask"][row], full_mask[row, columns])
        assert window["window_mask"][row].sum() == full_mask[row].sum()


def test_a_window_too_narrow_for_its_rows_is_refused():
    ids, _, loss = random_sft_rows(0)
    with pytest.raises(ValueError, match="misses scored tokens"):
        windows.target_window(ids, loss, 2)


def np_sft_nll(module, params, ids, attention, loss):
    """The summed next-token NLL of the scored tokens from the full logits, in float64."""
    positions = ((np.cumsum(attention, 1) - 1) * attention).astype(np.int32)
    logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, attention, positions), np.float64)
    peak = logits.max(-1, keepdims=True)
    log_probs = logits - (peak + np.log(np.sum(np.exp(logits - peak), -1, keepdims=True)))
    token = np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    return -np.sum(token * loss[:, 1:])


def test_sft_loss_on_windows_equals_the_full_softmax_nll_and_the_full_width_loss():
    module = llama.make_model(TINY)
    params = jax.jit(lambda key: module.init(key, np.zeros((1, 8), np.int32))["params"])(jax.random.key(0))
    ids, attention, loss = random_sft_rows(1)
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "position_ids": ((np.cumsum(attention, 1) - 1) * attention).astype(np.int32),
        "loss_mask": loss,
        "example_mask": np.array([1, 1, 1, 1, 0], np.int32),
    }
    spans = windows.ragged_spans(loss.ravel(), np.arange(0, loss.size + 1, loss.shape[1]))
    width = int(spans.max())
    assert width < ids.shape[1]  # the point: fewer positions projected
    windowed = dict(batch, **windows.target_window(ids, loss, width))
    loss_fn = jax.jit(sft.make_loss_fn(module, TINY, sft.SFTOptions(logprob_chunk_size=4)))
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, None, b, None)[0]))

    nll_windowed, metrics = loss_fn(params, None, windowed, None)
    nll_full, _ = loss_fn(params, None, batch, None)
    np.testing.assert_allclose(nll_windowed, np_sft_nll(module, params, ids, attention, loss), rtol=1e-5)
    np.testing.assert_allclose(nll_windowed, nll_full, rtol=1e-6)
    assert metrics["loss"][1] == loss[:, 1:].sum()
    for a, b in zip(jax.tree.leaves(grad_fn(params, windowed)), jax.tree.leaves(grad_fn(params, batch)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def demo_batcher(tmp_path, kind, **overrides):
    config = pipeline.default_config()
    config.path = str(DEMO_DATA / ("sft_train.jsonl" if kind == "sft" else "preference_train.jsonl"))
    config.tokenizer_path = str(DEMO_DATA / "tokenizer.model")
    config.kind, config.pad_id, config.num_proc = kind, 3, 1
    config.max_seq_len, config.max_prompt_len = 256, 128
    config.cache_dir = str(tmp_path / "cache")
    config.update(overrides)
    return pipeline.prepare_data(config).batcher


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_every_host_builds_the_width_of_the_whole_global_batch(tmp_path, kind):
    batcher = demo_batcher(tmp_path, kind)
    assert batcher.window_widths == (64, 128, 192, 256)
    rows = np.arange(8)
    mask = np.ones(4, np.int32)
    hosts = [batcher(rows[i : i + 4], mask, batch_positions=rows) for i in (0, 4)]
    prefix = "" if kind == "sft" else "chosen_"
    widths = {host[f"{prefix}window_targets"].shape[1] for host in hosts}
    assert widths == {batcher.loss_window_width(rows)} == {64}  # the demo's answers are short
    if kind == "preference":
        assert all(host["rejected_window_targets"].shape[1] == 64 for host in hosts)


def test_one_bucket_scores_the_full_width(tmp_path):
    batcher = demo_batcher(tmp_path, "sft", loss_window_buckets=1)
    batch = batcher(np.arange(4), np.ones(4, np.int32))
    assert batch["window_targets"].shape == (4, 256)


def test_a_non_positive_bucket_count_names_its_key(tmp_path):
    with pytest.raises(DataConfigError, match="loss_window_buckets"):
        demo_batcher(tmp_path, "sft", loss_window_buckets=0)
