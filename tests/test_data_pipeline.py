"""End to end: config -> validated, tokenised, cached data -> per-host batches that resume exactly."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.tokenizers import train_tiny_sentencepiece

from easyppo.data import pipeline
from easyppo.data.chat import make_chat_format
from easyppo.data.errors import BadRowsError, DataConfigError
from easyppo.data.tokenizer import load_tokenizer

SUBJECTS = ["the fox", "Paris", "two plus two", "the lazy dog", "computers", "France", "jokes", "the day"]
PREFERENCE_ROWS = [
    {
        "chosen": [
            {"role": "user", "content": f"Tell me about {s}."},
            {"role": "assistant", "content": f"Here is {s}."},
        ],
        "rejected": [{"role": "user", "content": f"Tell me about {s}."}, {"role": "assistant", "content": "No."}],
        "margin": float(i % 3),
    }
    for i, s in enumerate(SUBJECTS)
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return str(train_tiny_sentencepiece(tmp_path_factory.mktemp("tokenizer"), pad_piece=True))


@pytest.fixture(scope="module")
def chat(tokenizer_path):
    return make_chat_format("tulu", load_tokenizer(tokenizer_path))


@pytest.fixture
def hf_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keeps datasets.load_dataset's own cache in a temporary directory instead of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def config_for(path, tmp_path, tokenizer_file, **overrides):
    config = pipeline.default_config()
    config.path = path
    config.tokenizer_path = tokenizer_file
    config.max_seq_len = 96
    config.max_prompt_len = 64
    config.global_batch_size = 4
    config.num_proc = 1
    config.cache_dir = str(tmp_path / "cache")
    config.update(overrides)
    return config


class TokenizingForbidden:
    """A chat format with the real fingerprint that fails if asked to tokenise anything."""

    def __init__(self, chat):
        self.fingerprint = chat.fingerprint

    def __getattr__(self, name):
        raise AssertionError(f"tokenised again: {name} called")


def test_build_iterator_from_a_config_yields_per_host_preference_batches(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS)
    iterator = pipeline.build_iterator(config_for(path, tmp_path, tokenizer_path), process_index=1, process_count=2)
    batch = next(iterator)
    assert batch["chosen_input_ids"].shape == batch["rejected_loss_mask"].shape == (2, 96)
    assert batch["margin"].shape == batch["example_mask"].shape == (2,)
    assert iterator.stats["rows_used"] == len(PREFERENCE_ROWS)


def test_second_preparation_reads_the_cache_instead_of_tokenising(tmp_path, tokenizer_path, chat):
    config = config_for(write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS), tmp_path, tokenizer_path)
    first = pipeline.prepare_data(config, chat_format=chat)
    second = pipeline.prepare_data(config, tokenizer=chat.tokenizer, chat_format=TokenizingForbidden(chat))
    assert (first.stats.cache_hit, second.stats.cache_hit) == (False, True)
    rows = np.arange(len(PREFERENCE_ROWS))
    mask = np.ones(len(rows))
    for key, value in first.batcher(rows, mask).items():
        np.testing.assert_array_equal(second.batcher(rows, mask)[key], value)


def test_parallel_tokenisation_matches_single_process(tmp_path, tokenizer_path, chat):
    path = write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS)
    single = pipeline.prepare_data(config_for(path, tmp_path / "a", tokenizer_path), chat_format=chat)
    parallel = pipeline.prepare_data(config_for(path, tmp_path / "b", tokenizer_path, num_proc=2), chat_format=chat)
    rows = np.arange(len(PREFERENCE_ROWS))
    for key, value in single.batcher(rows, np.ones(len(rows))).items():
        np.testing.assert_array_equal(parallel.batcher(rows, np.ones(len(rows)))[key], value)


def test_the_same_rows_from_parquet_json_and_jsonl_give_the_same_fingerprint(tmp_path, tokenizer_path, chat):
    jsonl = write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS)
    (tmp_path / "prefs.json").write_text(json.dumps(PREFERENCE_ROWS))
    pq.write_table(pa.Table.from_pylist(PREFERENCE_ROWS), tmp_path / "prefs.parquet")
    fingerprints = {
        pipeline.prepare_data(config_for(path, tmp_path, tokenizer_path), chat_format=chat).fingerprint
        for path in (jsonl, str(tmp_path / "prefs.json"), str(tmp_path / "prefs.parquet"))
    }
    assert len(fingerprints) == 1


@pytest.mark.parametrize("change", [{"max_seq_len": 80}, {"truncation": "drop"}, {"chat_format": "plain"}, {"rows": 7}])
def test_fingerprint_changes_with_rows_format_settings_and_chat_format(tmp_path, tokenizer_path, change):
    def fingerprint(rows, **overrides):
        path = write_jsonl(tmp_path / f"prefs{len(rows)}.jsonl", rows)
        return pipeline.prepare_data(config_for(path, tmp_path, tokenizer_path, **overrides)).fingerprint

    change = dict(change)
    rows = PREFERENCE_ROWS[: change.pop("rows", len(PREFERENCE_ROWS))]
    assert fingerprint(rows, **change) != fingerprint(PREFERENCE_ROWS)


def test_fingerprint_changes_with_the_tokenizer_special_ids(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS)
    default = pipeline.prepare_data(config_for(path, tmp_path, tokenizer_path)).fingerprint
    other_pad = pipeline.prepare_data(config_for(path, tmp_path, tokenizer_path, pad_id=0)).fingerprint
    assert default != other_pad


def test_truncated_and_dropped_rows_are_counted(tmp_path, tokenizer_path, chat):
    long_answer = {"role": "assistant", "content": "Paris is the capital of France. " * 12}
    rows = PREFERENCE_ROWS[:4] + [{**PREFERENCE_ROWS[4], "chosen": [PREFERENCE_ROWS[4]["chosen"][0], long_answer]}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    counts = {}
    for mode in ("truncate", "drop"):
        config = config_for(path, tmp_path, tokenizer_path, truncation=mode, global_batch_size=2)
        stats = pipeline.prepare_data(config, chat_format=chat).stats
        counts[mode] = (stats.rows_truncated, stats.rows_dropped, stats.rows_used)
    assert counts == {"truncate": (1, 0, 5), "drop": (0, 1, 4)}


def test_dropping_every_row_is_an_error(tmp_path, tokenizer_path, chat):
    config = config_for(
        write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS),
        tmp_path,
        tokenizer_path,
        truncation="drop",
        max_seq_len=8,
        max_prompt_len=4,
    )
    with pytest.raises(BadRowsError, match="no usable rows among 8: 8 over-long rows were dropped"):
        pipeline.prepare_data(config, chat_format=chat)


def test_resumed_pipeline_iterator_continues_with_the_same_arrays(tmp_path, tokenizer_path, chat):
    config = config_for(
        write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS), tmp_path, tokenizer_path, global_batch_size=2
    )

    def build():
        return pipeline.build_iterator(config, process_index=0, process_count=1, chat_format=chat)

    original = build()
    for _ in range(3):
        next(original)
    state = json.loads(json.dumps(original.state()))
    expected = [next(original) for _ in range(3)]  # Crosses into the next epoch (4 batches per epoch).

    resumed = build()
    resumed.restore(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_two_hosts_get_the_two_halves_of_each_global_batch(tmp_path, tokenizer_path, chat):
    config = config_for(write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS), tmp_path, tokenizer_path)
    data = pipeline.prepare_data(config, chat_format=chat)
    single = pipeline.make_iterator(data, config, process_index=0, process_count=1)
    hosts = [pipeline.make_iterator(data, config, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        whole = next(single)
        halves = [next(host) for host in hosts]
        for key, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)


def test_sft_and_prompt_kinds_build_their_own_batch_keys(tmp_path, tokenizer_path):
    conversations = [{"messages": row["chosen"]} for row in PREFERENCE_ROWS]
    sft = pipeline.build_iterator(
        config_for(write_jsonl(tmp_path / "sft.jsonl", conversations), tmp_path, tokenizer_path, kind="sft"),
        process_index=0,
        process_count=1,
    )
    assert set(next(sft)) == {
        "input_ids",
        "attention_mask",
        "loss_mask",
        "position_ids",
        "window_start",
        "window_targets",
        "window_mask",
        "example_mask",
        "example_index",
    }
    prompts = [{"prompt": row["chosen"][0]["content"]} for row in PREFERENCE_ROWS]
    prompt = pipeline.build_iterator(
        config_for(write_jsonl(tmp_path / "prompts.jsonl", prompts), tmp_path, tokenizer_path, kind="prompt"),
        process_index=0,
        process_count=1,
    )
    batch = next(prompt)
    assert set(batch) == {
        "prompt_input_ids",
        "prompt_attention_mask",
        "prompt_position_ids",
        "example_mask",
        "example_index",
    }
    assert batch["prompt_input_ids"].shape == (4, 64)


def test_hf_dataset_directory_works_end_to_end(hf_cache_in_tmp, tmp_path, tokenizer_path):
    (tmp_path / "hub_like").mkdir()
    write_jsonl(tmp_path / "hub_like" / "train.jsonl", PREFERENCE_ROWS)
    config = config_for("", tmp_path, tokenizer_path, hf_dataset=str(tmp_path / "hub_like"), split="train")
    iterator = pipeline.build_iterator(config, process_index=0, process_count=1)
    assert next(iterator)["chosen_input_ids"].shape == (4, 96)


def test_default_process_index_and_count_come_from_jax(tmp_path, tokenizer_path):
    import jax

    config = config_for(write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS), tmp_path, tokenizer_path)
    iterator = pipeline.build_iterator(config)
    assert (iterator.process_index, iterator.process_count) == (jax.process_index(), jax.process_count())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kind": "dpo"}, "data.kind: must be one of"),
        ({"on_bad_row": "ignore"}, "data.on_bad_row: must be one of"),
        ({"max_bad_fraction": 1.5}, "data.max_bad_fraction: must be between 0 and 1"),
        ({"tokenizer_path": ""}, "data.tokenizer_path: is empty"),
        ({"tokenizer_path": "/no/such/tokenizer.model"}, "data.tokenizer_path: .*/no/such/tokenizer.model"),
        ({"chat_format": "chatml"}, "data.chat_format: unknown chat format 'chatml'"),
        ({"global_batch_size": 3}, "data.global_batch_size: 3 is not divisible by the number of hosts"),
    ],
)
def test_invalid_options_name_their_config_key(tmp_path, tokenizer_path, overrides, message):
    config = config_for(write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE_ROWS), tmp_path, tokenizer_path, **overrides)
    with pytest.raises(DataConfigError, match=message):
        pipeline.build_iterator(config, process_index=0, process_count=2)


def test_default_config_lists_every_option_once():
    config = pipeline.default_config()
    for key in (
        "path",
        "hf_dataset",
        "split",
        "kind",
        "chat_format",
        "max_seq_len",
        "max_prompt_len",
        "max_response_len",
        "truncation",
        "on_bad_row",
        "max_bad_fraction",
        "seed",
        "shuffle",
        "num_proc",
        "cache_dir",
        "tokenizer_path",
        "bos_id",
        "eos_id",
        "pad_id",
        "global_batch_size",
    ):
        assert key in config, key
