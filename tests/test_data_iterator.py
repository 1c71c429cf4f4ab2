"""Specification of the batch iterator: order, per-host sharding, epochs and exact resumption.

The iterator is exercised with a ``make_batch`` that returns the row positions themselves, so every
assertion is about *which rows* a host sees, independent of tokenisation.
"""

import json

import numpy as np
import pytest

from easyppo.data.errors import DataConfigError
from easyppo.data.iterator import BatchIterator, epoch_order


def positions_batch(positions, example_mask, *, batch_positions=None):
    del batch_positions
    return {"rows": np.asarray(positions), "example_mask": np.asarray(example_mask)}


def make_iterator(num_rows=20, global_batch_size=4, **kwargs):
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("fingerprint", "data-v1")
    return BatchIterator(num_rows, positions_batch, global_batch_size=global_batch_size, **kwargs)


def take(iterator, n):
    return [next(iterator)["rows"].tolist() for _ in range(n)]


def test_epoch_order_is_a_permutation():
    order = epoch_order(1000, seed=3, epoch=2)
    assert sorted(order.tolist()) == list(range(1000))


def _splitmix64(x):
    """Reference SplitMix64 output function on Python ints (mod 2**64)."""
    mask = 2**64 - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_epoch_order_is_the_documented_hash_sort_independent_of_numpy_generators():
    seed, epoch, n = 1234, 5, 40
    stream = _splitmix64(_splitmix64(seed) ^ epoch)
    keys = [_splitmix64((stream + row * 0x9E3779B97F4A7C15) % 2**64) for row in range(n)]
    expected = sorted(range(n), key=lambda row: (keys[row], row))
    assert epoch_order(n, seed=seed, epoch=epoch).tolist() == expected


def test_epoch_order_depends_only_on_seed_and_epoch():
    np.testing.assert_array_equal(epoch_order(50, seed=7, epoch=1), epoch_order(50, seed=7, epoch=1))
    assert epoch_order(50, seed=7, epoch=1).tolist() != epoch_order(50, seed=7, epoch=2).tolist()
    assert epoch_order(50, seed=7, epoch=1).tolist() != epoch_order(50, seed=8, epoch=1).tolist()


def test_epoch_order_without_shuffle_is_file_order():
    assert epoch_order(6, seed=7, epoch=3, shuffle=False).tolist() == [0, 1, 2, 3, 4, 5]


def test_shuffled_first_row_is_roughly_uniform_over_seeds():
    # 4000 seeds, 8 rows: each row should come first ~500 times (binomial std ~21).
    firsts = np.bincount([epoch_order(8, seed=s, epoch=0)[0] for s in range(4000)], minlength=8)
    assert np.all(np.abs(firsts - 500) < 120), firsts


def test_each_epoch_visits_every_row_once_with_drop_remainder():
    iterator = make_iterator(num_rows=10, global_batch_size=3, drop_remainder=True)
    assert iterator.batches_per_epoch == 3
    epoch = sum(take(iterator, 3), [])
    assert len(set(epoch)) == 9 and set(epoch) <= set(range(10))


def test_last_partial_batch_is_filled_and_masked_without_drop_remainder():
    iterator = make_iterator(num_rows=10, global_batch_size=4, drop_remainder=False, shuffle=False)
    batches = [next(iterator) for _ in range(3)]
    assert batches[2]["rows"].tolist() == [8, 9, 8, 8]
    assert batches[2]["example_mask"].tolist() == [1, 1, 0, 0]
    real = [r for b in batches for r, m in zip(b["rows"], b["example_mask"], strict=True) if m]
    assert sorted(real) == list(range(10))


def test_stops_after_num_epochs():
    iterator = make_iterator(num_rows=8, global_batch_size=4, num_epochs=2)
    assert len(list(iterator)) == 4


def test_repeats_forever_without_num_epochs():
    iterator = make_iterator(num_rows=8, global_batch_size=4)
    assert len(take(iterator, 9)) == 9


def test_consecutive_epochs_use_different_orders():
    iterator = make_iterator(num_rows=12, global_batch_size=12)
    first, second = take(iterator, 2)
    assert sorted(first) == sorted(second) and first != second


def test_two_hosts_together_see_exactly_the_global_batch():
    single = make_iterator(num_rows=24, global_batch_size=8)
    hosts = [make_iterator(num_rows=24, global_batch_size=8, process_index=i, process_count=2) for i in range(2)]
    for _ in range(5):  # Crosses an epoch boundary (3 batches per epoch).
        global_batch = next(single)["rows"].tolist()
        host0, host1 = (next(h)["rows"].tolist() for h in hosts)
        assert len(host0) == len(host1) == 4
        assert not set(host0) & set(host1)
        assert host0 + host1 == global_batch


def test_resume_mid_epoch_replays_the_identical_remaining_order():
    reference = make_iterator(num_rows=30, global_batch_size=4, seed=5)
    take(reference, 3)
    saved = json.loads(json.dumps(reference.state()))  # It must survive a JSON checkpoint.
    expected = take(reference, 10)  # Runs past the end of epoch 0 (7 batches per epoch).

    resumed = make_iterator(num_rows=30, global_batch_size=4, seed=5)
    resumed.restore(saved)
    assert take(resumed, 10) == expected


def test_resume_on_a_different_number_of_hosts_sees_the_same_global_batches():
    one_host = make_iterator(num_rows=16, global_batch_size=4)
    take(one_host, 2)
    saved = one_host.state()
    expected = take(one_host, 3)

    hosts = [make_iterator(num_rows=16, global_batch_size=4, process_index=i, process_count=2) for i in range(2)]
    for host in hosts:
        host.restore(saved)
    for global_batch in expected:
        assert sum((next(h)["rows"].tolist() for h in hosts), []) == global_batch


def test_state_reports_epoch_and_next_batch():
    iterator = make_iterator(num_rows=8, global_batch_size=4)
    take(iterator, 3)
    state = iterator.state()
    assert (state["epoch"], state["batch"]) == (1, 1)


@pytest.mark.parametrize(
    "change", [{"fingerprint": "data-v2"}, {"seed": 1}, {"global_batch_size": 2}, {"num_rows": 21}]
)
def test_restore_rejects_a_state_from_different_data_or_order(change):
    saved = make_iterator().state()
    with pytest.raises(ValueError, match=list(change)[0]):
        make_iterator(**change).restore(saved)


def test_global_batch_must_split_evenly_over_hosts():
    with pytest.raises(DataConfigError, match=r"data\.global_batch_size: 6 is not divisible .* \(4\)"):
        make_iterator(global_batch_size=6, process_index=0, process_count=4)


def test_batch_larger_than_the_dataset_is_an_error_with_drop_remainder():
    with pytest.raises(DataConfigError, match=r"data\.global_batch_size: 32 is larger than the dataset \(20"):
        make_iterator(num_rows=20, global_batch_size=32)
