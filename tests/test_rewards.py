"""The verifiable reward sources: the built-in checkers, spec parsing, user functions, weighted sums,
the prompt rows' ``answer`` field, and the demo's counting reward."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from easyppo.configs import demo_rewards
from easyppo.core.options import OptionError
from easyppo.data.errors import RowError
from easyppo.data.schema import validate_record
from easyppo.rewards import functions
from easyppo.rewards.sources import RewardSources, parse_reward_spec


def test_final_answer_prefers_boxed_then_a_stated_answer_then_the_last_line():
    assert functions.final_answer("so \\boxed{7} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert functions.final_answer("Work...\nThe answer is 42.") == "42."
    assert functions.final_answer("first\n\n  last line  \n").strip() == "last line"


def test_exact_match_ignores_case_spacing_dollars_and_final_punctuation():
    responses = ["The answer is  Paris.", "answer: $x+1$", "Rome", "no answer here"]
    assert functions.exact_match(responses, ["paris", "x+1", "Paris", None], [""] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_numeric_compares_the_last_number_within_tolerance():
    score = functions.numeric(1e-6)
    responses = ["2 + 2 = 4, so the answer is 4", "The answer is 1,234.0", "about 3.14159", "none"]
    assert score(responses, ["4", "1234", "3.14", "1"], [""] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert functions.numeric(1e-3)(["about 3.14159"], ["3.1416"], [""]) == [1.0]


def test_math_verify_accepts_equivalent_forms():
    pytest.importorskip("math_verify")
    responses = ["The answer is $\\frac{1}{2}$", "so x = 0.5", "I get 2/3"]
    assert functions.math_verify(responses, ["0.5", "\\frac{1}{2}", "0.5"], [""] * 3) == [1.0, 1.0, 0.0]


def test_format_searches_its_pattern():
    assert functions.format_match(r"<answer>.*</answer>")(["x <answer>1</answer>", "1"], [None, None], ["", ""]) == [
        1.0,
        0.0,
    ]


def test_a_spec_names_sources_with_optional_weights_in_order():
    assert parse_reward_spec("math_verify, format=0.1,reward_model=2") == {
        "math_verify": 1.0,
        "format": 0.1,
        "reward_model": 2.0,
    }


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown reward source 'nope'"),
        ("numeric=abc", "the weight of 'numeric' is not a number"),
        ("numeric=inf", "must be finite"),
        ("numeric,numeric=2", "named twice"),
    ],
)
def test_a_bad_spec_fails_naming_the_key(spec, message):
    with pytest.raises(OptionError, match=f"grpo.rewards: .*{message}"):
        parse_reward_spec(spec, key="grpo.rewards")


def test_sources_add_weighted_host_rewards_and_leave_the_reward_model_to_the_device(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.length = lambda responses, answers, prompts: [len(r) for r in responses]
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    sources = RewardSources.from_spec("numeric,my_rewards:length=0.5,reward_model=3")
    total, per_source = sources.score(["is 4", "is 5"], ["4", "4"], ["", ""])
    np.testing.assert_allclose(per_source["numeric"], [1.0, 0.0])
    np.testing.assert_allclose(per_source["my_rewards:length"], [4.0, 4.0])
    np.testing.assert_allclose(total, [3.0, 2.0])
    assert sources.reward_model_weight == 3.0 and sources.names == ("numeric", "my_rewards:length")
    assert sources.needs_answers


@pytest.mark.parametrize(
    "returned, message",
    [([1.0], "returned 1 values for 2 responses"), ([1.0, float("nan")], "returned nan for response 1")],
)
def test_a_user_function_that_returns_the_wrong_thing_is_named(monkeypatch, returned, message):
    module = types.ModuleType("bad_rewards")
    module.fn = lambda responses, answers, prompts: returned
    monkeypatch.setitem(sys.modules, "bad_rewards", module)
    with pytest.raises(ValueError, match=f"'bad_rewards:fn' {message}"):
        RewardSources.from_spec("bad_rewards:fn").score(["a", "b"], [None, None], ["", ""])


def test_a_missing_user_function_fails_naming_the_key():
    with pytest.raises(OptionError, match="grpo.rewards: 'json' has no function 'nope'"):
        RewardSources.from_spec("json:nope", key="grpo.rewards")


# --------------------------------------------------------------------------- the answer field


def test_prompt_rows_keep_their_answer_as_text():
    assert validate_record({"prompt": "2+2?", "answer": 4}, "prompt")["answer"] == "4"
    assert validate_record({"prompt": "2+2?", "answer": "4"}, "prompt")["answer"] == "4"
    assert validate_record({"prompt": "2+2?"}, "prompt")["answer"] is None


@pytest.mark.parametrize(
    "answer, reason",
    [([4, 5], "expected a string or a number, got"), (True, "expected a string or a number"), ("  ", "empty")],
)
def test_a_bad_answer_is_a_row_error_naming_file_row_and_field(answer, reason):
    with pytest.raises(RowError) as raised:
        validate_record({"prompt": "x", "answer": answer}, "prompt", source="data.jsonl", row=3)
    assert str(raised.value).startswith("data.jsonl, row 3, field 'answer': ") and reason in str(raised.value)


def test_the_demo_counting_reward_needs_the_frame_and_the_count():
    responses = [
        "The fox is bright, kind and warm. That is all.",
        "The fox is dull, rude and grim. So it goes.",
        "The fox is dull.",
        "The fox is bright, kind and grim.",
    ]
    assert demo_rewards.nice_word_count(responses, ["3", "0", "0", "3"], [""] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_the_bundled_counting_rows_ask_for_the_number_their_answer_holds():
    from helpers.demo_data import DEMO_DATA

    rows = [json.loads(line) for line in (DEMO_DATA / "counting_eval.jsonl").read_text().splitlines()]
    assert {row["answer"] for row in rows} == {"0", "3"}
    assert all(f"with {row['answer']} nice words" in row["messages"][-1]["content"] for row in rows)


def test_data_answer_field_reads_another_or_a_nested_field_and_prompt_may_be_a_conversation():
    row = {"prompt": [{"role": "user", "content": "2+2?"}], "reward_model": {"ground_truth": "4"}}
    record = validate_record(row, "prompt", answer_field="reward_model.ground_truth")
    assert record == {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}
    assert (
        validate_record({"prompt": "x", "ground_truth": ["7"]}, "prompt", answer_field="ground_truth")["answer"] == "7"
    )
    with pytest.raises(RowError, match="field 'ground_truth': expected a string or a number"):
        validate_record({"prompt": "x", "ground_truth": {"a": 1}}, "prompt", answer_field="ground_truth")
