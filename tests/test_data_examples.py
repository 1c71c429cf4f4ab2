"""Tokenised examples: loss masks (checked by decoding), padding, position ids and truncation.

Expected token ids always come from the chat format itself (``encode_prompt``, ``encode_response``,
``encode_conversation``), never from the code under test.
"""

import dataclasses

import numpy as np
import pytest
from helpers.tokenizers import make_tiny_hf_tokenizer_dir, train_tiny_sentencepiece

from easyppo.data.batcher import ExampleBatcher
from easyppo.data.chat import make_chat_format
from easyppo.data.errors import DataConfigError
from easyppo.data.examples import ExampleSettings, RowEncoder, Status, tokenize_records
from easyppo.data.tokenizer import load_tokenizer

WIDTH = 128


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """Tulu over a Llama-2-like sentencepiece model."""
    tokenizer = load_tokenizer(train_tiny_sentencepiece(tmp_path_factory.mktemp("sp"), pad_piece=True))
    return make_chat_format("tulu", tokenizer)


@pytest.fixture(scope="module", params=["tulu", "llama3"])
def any_chat(request, tmp_path_factory, chat):
    """Each built-in chat format over its own kind of tokenizer (sentencepiece / tokenizer.json)."""
    if request.param == "tulu":
        return chat
    return make_chat_format("llama3", load_tokenizer(make_tiny_hf_tokenizer_dir(tmp_path_factory.mktemp("hf"))))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def settings(kind, **overrides):
    values = dict(kind=kind, chat_format="tulu", max_seq_len=WIDTH, max_prompt_len=WIDTH - 32, truncation="truncate")
    values.update(overrides)
    return ExampleSettings(**values)


def batch_of(records, example_settings, chat, tmp_path, example_mask=None):
    example_settings = dataclasses.replace(example_settings, chat_format=chat.name)
    encoder = RowEncoder(chat, example_settings, bos_id=chat.tokenizer.bos_id)
    tokenized, _ = tokenize_records(records, encoder, cache_dir=str(tmp_path), fingerprint="test", num_proc=1)
    batcher = ExampleBatcher(tokenized, example_settings, pad_id=chat.tokenizer.pad_id)
    mask = np.ones(len(records)) if example_mask is None else np.asarray(example_mask)
    return batcher(np.arange(len(records)), mask)


def masked_spans(ids, mask):
    """Token runs where mask == 1, as lists of ids."""
    spans, current = [], []
    for token, bit in zip(ids.tolist(), mask.tolist(), strict=True):
        if bit:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


CONVERSATION = [
    user("What is the capital of France?"),
    assistant("Paris is the capital of France."),
    user("What is two plus two?"),
    assistant("Two plus two is four."),
]
PREFERENCE = {
    "prompt": CONVERSATION[:3],
    "chosen": "Two plus two is four.",
    "rejected": "The quick brown fox.",
    "margin": 1.5,
}


def test_sft_loss_mask_decodes_to_every_assistant_turn(any_chat, tmp_path):
    batch = batch_of([{"messages": CONVERSATION}], settings("sft"), any_chat, tmp_path)
    spans = masked_spans(batch["input_ids"][0], batch["loss_mask"][0])
    decoded = [any_chat.tokenizer.decode(span) for span in spans]
    assert decoded == [CONVERSATION[1]["content"], CONVERSATION[3]["content"]]
    # Each trained span ends with the end-of-turn token, which the model must learn to emit.
    assert [span[-1] for span in spans] == [any_chat.end_of_turn_id] * 2


def test_sft_last_assistant_mode_trains_on_the_final_turn_only(any_chat, tmp_path):
    batch = batch_of([{"messages": CONVERSATION}], settings("sft", train_on="last_assistant"), any_chat, tmp_path)
    spans = masked_spans(batch["input_ids"][0], batch["loss_mask"][0])
    assert [any_chat.tokenizer.decode(span) for span in spans] == [CONVERSATION[3]["content"]]


def test_sft_ids_are_the_chat_formats_conversation_right_padded(any_chat, tmp_path):
    batch = batch_of([{"messages": CONVERSATION}], settings("sft"), any_chat, tmp_path)
    reference = any_chat.encode_conversation(CONVERSATION)
    n = len(reference.ids)
    assert batch["input_ids"][0].tolist() == reference.ids + [any_chat.tokenizer.pad_id] * (WIDTH - n)
    assert batch["loss_mask"][0].tolist() == reference.loss_mask + [0] * (WIDTH - n)


def test_right_padded_attention_mask_and_position_ids(any_chat, tmp_path):
    batch = batch_of([{"messages": CONVERSATION[:2]}], settings("sft"), any_chat, tmp_path)
    n = len(any_chat.encode_conversation(CONVERSATION[:2]).ids)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (WIDTH - n)
    assert batch["position_ids"][0].tolist() == list(range(n)) + [0] * (WIDTH - n)


def test_preference_loss_masks_decode_to_the_final_responses_only(any_chat, tmp_path):
    batch = batch_of([PREFERENCE], settings("preference"), any_chat, tmp_path)
    for side in ("chosen", "rejected"):
        spans = masked_spans(batch[f"{side}_input_ids"][0], batch[f"{side}_loss_mask"][0])
        assert [any_chat.tokenizer.decode(span) for span in spans] == [PREFERENCE[side]]


def test_preference_pair_is_prompt_plus_each_response(any_chat, tmp_path):
    batch = batch_of([PREFERENCE], settings("preference"), any_chat, tmp_path)
    prompt = any_chat.encode_prompt(PREFERENCE["prompt"])
    for side in ("chosen", "rejected"):
        expected = prompt + any_chat.encode_response(PREFERENCE[side])
        row = batch[f"{side}_input_ids"][0]
        assert row.tolist() == expected + [any_chat.tokenizer.pad_id] * (WIDTH - len(expected))
        assert batch[f"{side}_attention_mask"][0].sum() == len(expected)
        assert batch[f"{side}_position_ids"][0, : len(expected)].tolist() == list(range(len(expected)))


def test_preference_margin_is_carried_and_defaults_to_zero(chat, tmp_path):
    records = [PREFERENCE, {**PREFERENCE, "margin": 0.0}]
    batch = batch_of(records, settings("preference"), chat, tmp_path)
    assert batch["margin"].dtype == np.float32
    assert batch["margin"].tolist() == [1.5, 0.0]


def test_prompts_are_left_padded_for_generation(any_chat, tmp_path):
    prompt = [user("Tell me a joke about computers, please.")]
    expected = any_chat.encode_prompt(prompt)
    n, width = len(expected), len(expected) + 7
    batch = batch_of([{"prompt": prompt}], settings("prompt", max_prompt_len=width), any_chat, tmp_path)
    assert batch["prompt_input_ids"][0].tolist() == [any_chat.tokenizer.pad_id] * 7 + expected
    assert batch["prompt_attention_mask"][0].tolist() == [0] * 7 + [1] * n
    assert batch["prompt_position_ids"][0].tolist() == [0] * 7 + list(range(n))


def test_filler_rows_have_no_loss(chat, tmp_path):
    batch = batch_of([PREFERENCE, PREFERENCE], settings("preference"), chat, tmp_path, example_mask=[1, 0])
    assert batch["example_mask"].tolist() == [1, 0]
    assert batch["chosen_loss_mask"][1].sum() == batch["rejected_loss_mask"][1].sum() == 0
    assert batch["chosen_loss_mask"][0].sum() > 0


def test_all_arrays_have_fixed_shapes_and_integer_dtype(chat, tmp_path):
    short = {"prompt": [user("Hi")], "chosen": "Hello", "rejected": "No", "margin": 0.0}
    batch = batch_of([PREFERENCE, short], settings("preference"), chat, tmp_path)
    for key, value in batch.items():
        one_per_row = key in ("margin", "example_mask", "example_index") or key.endswith("window_start")
        expected_shape = (2,) if one_per_row else (2, WIDTH)
        assert value.shape == expected_shape, key
        assert value.dtype == (np.float32 if key == "margin" else np.int32), key


def test_over_long_prompt_is_cut_from_the_left_keeping_bos(chat):
    prompt = [user("The quick brown fox jumps over the lazy dog. " * 4)]
    full = chat.encode_prompt(prompt)
    encoder = RowEncoder(chat, settings("prompt", max_prompt_len=10), bos_id=chat.tokenizer.bos_id)
    row = encoder.encode({"prompt": prompt})
    assert row["status"] == Status.TRUNCATED
    assert row["prompt_ids"] == [chat.tokenizer.bos_id] + full[-9:]


def test_over_long_response_is_cut_from_the_right(chat):
    record = {"prompt": [user("Hi")], "chosen": "Paris is the capital of France. " * 5, "rejected": "No", "margin": 0.0}
    prompt = chat.encode_prompt(record["prompt"])
    chosen = chat.encode_response(record["chosen"])
    seq_len = len(prompt) + 6
    encoder = RowEncoder(
        chat, settings("preference", max_seq_len=seq_len, max_prompt_len=len(prompt)), bos_id=chat.tokenizer.bos_id
    )
    row = encoder.encode(record)
    assert row["status"] == Status.TRUNCATED
    assert row["prompt_ids"] == prompt
    assert row["chosen_ids"] == chosen[:6]
    assert row["rejected_ids"] == chat.encode_response("No")


def test_max_response_len_limits_each_response(chat):
    record = {"prompt": [user("Hi")], "chosen": "Two plus two is four.", "rejected": "No", "margin": 0.0}
    encoder = RowEncoder(chat, settings("preference", max_response_len=3), bos_id=chat.tokenizer.bos_id)
    row = encoder.encode(record)
    assert row["chosen_ids"] == chat.encode_response(record["chosen"])[:3]
    assert row["rejected_ids"] == chat.encode_response("No")[:3]


def test_truncated_sft_row_keeps_its_loss_mask_aligned(chat):
    reference = chat.encode_conversation(CONVERSATION)
    split = len(chat.encode_prompt(CONVERSATION[:3]))
    encoder = RowEncoder(chat, settings("sft", max_prompt_len=12), bos_id=chat.tokenizer.bos_id)
    row = encoder.encode({"messages": CONVERSATION})
    keep = [0, *range(split - 11, len(reference.ids))]  # BOS, the last 11 prompt tokens, the response.
    assert row["input_ids"] == [reference.ids[i] for i in keep]
    assert row["loss_mask"] == [reference.loss_mask[i] for i in keep]


def test_drop_mode_marks_over_long_rows_as_dropped(chat):
    encoder = RowEncoder(chat, settings("prompt", max_prompt_len=5, truncation="drop"), bos_id=chat.tokenizer.bos_id)
    row = encoder.encode({"prompt": [user("The quick brown fox jumps over the lazy dog.")]})
    assert row["status"] == Status.DROPPED
    assert row["prompt_ids"] == []


def test_error_mode_names_the_over_long_part(chat):
    record = {"prompt": [user("Hi")], "chosen": "Paris is the capital of France. " * 5, "rejected": "No", "margin": 0.0}
    seq_len = len(chat.encode_prompt(record["prompt"])) + 6
    encoder = RowEncoder(
        chat,
        settings("preference", max_seq_len=seq_len, max_prompt_len=None, truncation="error"),
        bos_id=chat.tokenizer.bos_id,
    )
    row = encoder.encode(record)
    assert (row["status"], row["error_field"], row["error_reason"]) == (Status.ERROR, "chosen", "too_long")
    assert f"more than data.max_seq_len={seq_len}" in row["error_detail"]


def test_rows_within_the_limits_are_untouched(chat):
    encoder = RowEncoder(chat, settings("prompt", max_prompt_len=64), bos_id=chat.tokenizer.bos_id)
    prompt = [user("Hi")]
    assert encoder.encode({"prompt": prompt}) | {} == {
        "prompt_ids": chat.encode_prompt(prompt),
        "answer": None,
        "status": Status.OK,
        "error_field": "",
        "error_reason": "",
        "error_detail": "",
    }


def test_chat_format_rejection_becomes_a_row_error(chat):
    class RejectingFormat:
        fingerprint = "rejecting"

        def encode_prompt(self, messages):
            raise ValueError("the template refuses system turns")

    encoder = RowEncoder(RejectingFormat(), settings("prompt"), bos_id=1)
    row = encoder.encode({"prompt": [user("Hi")]})
    assert (row["status"], row["error_field"], row["error_reason"]) == (Status.ERROR, "prompt", "chat_format")
    assert row["error_detail"] == "the template refuses system turns"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_prompt_len": WIDTH}, "data.max_prompt_len: must be smaller than data.max_seq_len=128"),
        ({"truncation": "cut"}, "data.truncation: must be one of"),
        ({"max_response_len": 0}, "data.max_response_len: must be a positive number of tokens"),
        ({"kind": "prompt", "max_prompt_len": None}, "data.max_prompt_len: is required for kind='prompt'"),
        ({"max_seq_len": None}, "data.max_seq_len: is required for kind='sft'"),
    ],
)
def test_inconsistent_length_settings_name_the_config_key(overrides, message):
    with pytest.raises(DataConfigError, match=message):
        settings(overrides.pop("kind", "sft"), **overrides)
