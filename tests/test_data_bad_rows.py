"""The bad-input corpus: every malformed row is reported with its file, 1-based row and field.

Each case writes a JSONL file whose first line is a valid row and whose second line is the bad one,
runs the real data preparation, and checks the exact location prefix of the message
(``<file>, row 2, field '<field>': ...``) plus the words that explain the problem.
"""

import json

import pytest
from helpers.tokenizers import train_tiny_sentencepiece

from easyppo.data import pipeline
from easyppo.data.chat import make_chat_format
from easyppo.data.errors import BadRowsError, TooManyBadRowsError
from easyppo.data.tokenizer import load_tokenizer

GOOD_ROWS = {
    "sft": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    "preference": {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    "prompt": {"prompt": "Tell me a joke."},
}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 10

# (case id, kind, bad line, field or None for whole-row problems, words the message must contain)
CORPUS = [
    ("non_json_line", "sft", "this is not json", None, "not valid JSON"),
    ("truncated_json_line", "sft", '{"messages": [', None, "not valid JSON"),
    ("row_is_not_an_object", "sft", "[1, 2]", None, "expected an object with named fields, got array"),
    ("missing_messages", "sft", {"text": "hi"}, "messages", "is missing"),
    ("messages_wrong_type", "sft", {"messages": "hello"}, "messages", "expected an array of messages, got string"),
    ("empty_conversation", "sft", {"messages": []}, "messages", "has no messages"),
    ("message_not_an_object", "sft", {"messages": ["hi", assistant("x")]}, "messages[0]", "expected a message object"),
    ("missing_content", "sft", {"messages": [user("a"), {"role": "assistant"}]}, "messages[1].content", "is missing"),
    ("null_role", "sft", {"messages": [{"role": None, "content": "a"}, assistant("b")]}, "messages[0].role", "is null"),
    (
        "content_wrong_type",
        "sft",
        {"messages": [user("a"), {"role": "assistant", "content": 42}]},
        "messages[1].content",
        "expected a string, got number",
    ),
    (
        "unknown_role",
        "sft",
        {"messages": [user("a"), {"role": "bot", "content": "b"}]},
        "messages[1].role",
        "unknown role 'bot'",
    ),
    (
        "not_ending_with_assistant",
        "sft",
        {"messages": [user("a"), assistant("b"), user("c")]},
        "messages[2].role",
        "must end with an assistant turn, got 'user'",
    ),
    ("empty_response", "sft", {"messages": [user("a"), assistant("   ")]}, "messages[1].content", "response is empty"),
    (
        "assistant_after_system_turn",
        "sft",
        {"messages": [{"role": "system", "content": "s"}, assistant("b")]},
        "messages[1].role",
        "must directly follow a user turn, but this one follows 'system'",
    ),
    (
        "conversation_starting_with_assistant",
        "sft",
        {"messages": [assistant("a"), user("b"), assistant("c")]},
        "messages[0].role",
        "cannot start with an assistant turn",
    ),
    (
        "different_prompts",
        "preference",
        {"chosen": [user("What is 2+2?"), assistant("4")], "rejected": [user("What is 3+3?"), assistant("5")]},
        "rejected[0].content",
        "chosen and rejected must share the prompt",
    ),
    (
        "different_prompt_lengths",
        "preference",
        {"chosen": [user("a"), assistant("b"), user("c"), assistant("d")], "rejected": [user("c"), assistant("e")]},
        "rejected[0].content",
        "share the prompt",
    ),
    ("missing_rejected", "preference", {"prompt": "p", "chosen": "c"}, "rejected", "is missing"),
    (
        "mixed_spellings",
        "preference",
        {"chosen": [user("a"), assistant("b")], "rejected": "c"},
        "rejected",
        "expected an array of messages like 'chosen', got string",
    ),
    ("string_form_without_prompt", "preference", {"chosen": "c", "rejected": "r"}, "prompt", "is missing"),
    (
        "empty_rejected_response",
        "preference",
        {"prompt": "p", "chosen": "c", "rejected": ""},
        "rejected",
        "response is empty",
    ),
    (
        "margin_wrong_type",
        "preference",
        {"prompt": "p", "chosen": "c", "rejected": "r", "margin": "high"},
        "margin",
        "expected a number, got string",
    ),
    (
        "margin_not_finite",
        "preference",
        '{"prompt": "p", "chosen": "c", "rejected": "r", "margin": NaN}',
        "margin",
        "must be finite",
    ),
    (
        "identical_string_responses",
        "preference",
        {"prompt": "p", "chosen": "same answer", "rejected": "same answer"},
        "rejected",
        "is identical to 'chosen'",
    ),
    (
        "identical_final_assistant_turns",
        "preference",
        {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]},
        "rejected",
        "is identical to 'chosen'",
    ),
    (
        "non_string_chosen_in_the_string_form",
        "preference",
        {"prompt": "p", "chosen": ["not", "a", "string"], "rejected": "r"},
        "chosen",
        "expected a string (the prompt + chosen + rejected form), got array",
    ),
    (
        "margin_overflowing_float32",
        "preference",
        {"prompt": "p", "chosen": "c", "rejected": "r", "margin": 1e39},
        "margin",
        "must be finite in float32",
    ),
    (
        "prompt_ending_with_assistant",
        "prompt",
        {"messages": [user("a"), assistant("b")]},
        "messages[1].role",
        "must end with a user turn",
    ),
    ("empty_prompt_string", "prompt", {"prompt": "  "}, "prompt", "prompt is empty"),
    ("prompt_row_without_prompt", "prompt", {"question": "q"}, "messages", "needs 'messages'"),
    (
        "invalid_utf8",
        "sft",
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}',
        "messages[0].content",
        "not valid UTF-8",
    ),
    ("lone_surrogate_escape", "prompt", '{"prompt": "bad \\ud800 escape"}', "prompt", "not valid UTF-8"),
    ("prompt_longer_than_the_limit", "prompt", {"prompt": LONG_PROMPT}, "prompt", "more than data.max_prompt_len=64"),
]


def write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, (dict, list)):
                line = json.dumps(line)
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            f.write(b"\n")
    return str(path)


def data_config(path, kind, tmp_path, **overrides):
    config = pipeline.default_config()
    config.path = path
    config.kind = kind
    config.max_seq_len = 128
    config.max_prompt_len = 64
    config.truncation = "error"
    config.num_proc = 1
    config.global_batch_size = 1
    config.cache_dir = str(tmp_path / "cache")
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    tokenizer = load_tokenizer(train_tiny_sentencepiece(tmp_path_factory.mktemp("tokenizer"), pad_piece=True))
    return make_chat_format("tulu", tokenizer)


@pytest.fixture
def prepare(chat):
    return lambda config: pipeline.prepare_data(config, chat_format=chat)


def test_corpus_has_at_least_fifteen_distinct_cases():
    assert len({case[0] for case in CORPUS}) == len(CORPUS) >= 15


@pytest.mark.parametrize("case, kind, bad_line, field, words", CORPUS, ids=[case[0] for case in CORPUS])
def test_malformed_row_is_reported_with_file_row_and_field(prepare, tmp_path, case, kind, bad_line, field, words):
    path = write_jsonl(tmp_path / f"{case}.jsonl", [GOOD_ROWS[kind], bad_line])
    with pytest.raises(BadRowsError) as excinfo:
        prepare(data_config(path, kind, tmp_path))

    (error,) = excinfo.value.errors
    assert (error.source, error.row, error.field) == (path, 2, field)
    location = f"{path}, row 2" + (f", field '{field}'" if field else "")
    assert f"{location}: " in str(excinfo.value)
    assert words in str(error)


def test_all_bad_rows_are_listed_together(prepare, tmp_path):
    lines = [GOOD_ROWS["sft"], {"messages": []}, GOOD_ROWS["sft"], "oops"]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(BadRowsError, match="2 of 4 rows are malformed") as excinfo:
        prepare(data_config(path, "sft", tmp_path))
    assert [(e.row, e.reason) for e in excinfo.value.errors] == [(2, "empty_conversation"), (4, "invalid_json")]


def test_row_numbers_are_line_numbers_when_blank_lines_are_present(prepare, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROWS["sft"], "", "", {"messages": 3}])
    with pytest.raises(BadRowsError, match=f"{path}, row 4, field 'messages'"):
        prepare(data_config(path, "sft", tmp_path))


def test_skip_mode_skips_and_counts_bad_rows_by_reason(prepare, tmp_path):
    lines = [GOOD_ROWS["preference"]] * 8 + ["{bad", {"prompt": "p", "chosen": "c"}]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    data = prepare(data_config(path, "preference", tmp_path, on_bad_row="skip", max_bad_fraction=0.2))
    assert data.stats.rows_read == 10
    assert data.stats.rows_bad == 2
    assert data.stats.bad_by_reason == {"invalid_json": 1, "missing_field": 1}
    assert data.stats.rows_used == len(data.batcher) == 8


def test_skip_mode_aborts_when_the_bad_fraction_exceeds_the_limit(prepare, tmp_path):
    lines = [GOOD_ROWS["preference"]] * 8 + ["{bad", {"prompt": "p", "chosen": "c"}]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(TooManyBadRowsError, match=r"2 of 10 rows \(20.00%\) .*data\.max_bad_fraction=0.1") as excinfo:
        prepare(data_config(path, "preference", tmp_path, on_bad_row="skip", max_bad_fraction=0.1))
    assert f"{path}, row 9: not valid JSON" in str(excinfo.value)


def test_skip_mode_counts_rows_that_fail_only_at_tokenisation(prepare, tmp_path):
    lines = [GOOD_ROWS["prompt"]] * 3 + [{"prompt": LONG_PROMPT}]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    data = prepare(data_config(path, "prompt", tmp_path, on_bad_row="skip", max_bad_fraction=0.25))
    assert data.stats.bad_by_reason == {"too_long": 1}
    assert data.stats.rows_used == 3


def test_errors_survive_pickling_across_processes(prepare, tmp_path):
    import pickle

    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROWS["sft"], "oops"])
    with pytest.raises(BadRowsError) as excinfo:
        prepare(data_config(path, "sft", tmp_path))
    restored = pickle.loads(pickle.dumps(excinfo.value))
    assert str(restored) == str(excinfo.value)
    assert (restored.errors[0].row, restored.errors[0].reason) == (2, "invalid_json")
