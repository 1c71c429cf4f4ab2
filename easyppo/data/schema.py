"""Row formats and the cheap validation pass that runs before anything is tokenised.

Three kinds of rows are accepted (field names are the JSON keys):

* ``"sft"``: ``messages``, a conversation (``[{"role", "content"}, ...]``) ending in an assistant turn.
* ``"preference"``: either ``chosen`` and ``rejected`` as two conversations that share every message
  but the final assistant turn (the Tulu 2.5 preference-data shape; a ``prompt`` string next to them
  is ignored), or ``prompt`` + ``chosen`` + ``rejected`` as plain strings. Optional numeric ``margin``.
* ``"prompt"`` (RL rollouts): ``messages`` ending in a user turn, or ``prompt`` (a string or such a
  conversation); an optional ``answer`` (string or number; ``data.answer_field`` names another field,
  nested with dots) is the ground truth that verifiable rewards check responses against.

Roles are ``system``, ``user`` and ``assistant``; every assistant turn must directly follow a user
turn (what every chat format assumes). Unknown extra fields (``id``, ``source``, ...) are ignored.

Every valid row is normalised to one record shape per kind, so tokenisation (and the dataset
fingerprint) never sees the difference between the string and the message-list spellings:

* sft:        ``{"messages": [message, ...]}``
* preference: ``{"prompt": [message, ...], "chosen": str, "rejected": str, "margin": float}``
* prompt:     ``{"prompt": [message, ...], "answer": str | None}``

where ``prompt`` ends in a user turn and ``chosen`` / ``rejected`` are the final assistant contents.
Invalid rows become :class:`RowError` s naming source, row and field; nothing is raised here, the
caller decides (``on_bad_row``) what to do with them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from easyppo.data.errors import RowError
from easyppo.data.sources import RawRecord, type_name

KINDS = ("sft", "preference", "prompt")
ROLES = ("system", "user", "assistant")

Message = dict[str, str]


@dataclasses.dataclass
class ValidatedRows:
    """The outcome of validating a source: normalised good rows, where they came from, and errors.

    ``records[i]`` came from ``locations[i]`` = (source, row). ``num_read`` counts every row read,
    good or bad, and is the denominator of the bad-row fraction.
    """

    kind: str
    records: list[dict[str, Any]]
    locations: list[tuple[str, int]]
    errors: list[RowError]
    num_read: int


def validate_records(raw_records: Iterable[RawRecord], kind: str, *, answer_field: str = "answer") -> ValidatedRows:
    """Validates and normalises every record; bad rows are collected, not raised.

    ``answer_field`` names a prompt row's ground truth (``"ground_truth"``, or a dotted path such as
    ``"reward_model.ground_truth"`` for a nested object).
    """
    normalise = _normaliser(kind)
    result = ValidatedRows(kind, [], [], [], 0)
    for raw in raw_records:
        result.num_read += 1
        if raw.error is not None:
            result.errors.append(raw.error)
            continue
        try:
            record = normalise(_Where(raw.source, raw.row, answer_field), raw.value)
        except RowError as error:
            result.errors.append(error)
            continue
        result.records.append(record)
        result.locations.append((raw.source, raw.row))
    return result


def validate_record(
    value: Any, kind: str, *, source: str = "<row>", row: int = 1, answer_field: str = "answer"
) -> dict[str, Any]:
    """Validates one row value and returns its normalised record; raises :class:`RowError`."""
    return _normaliser(kind)(_Where(source, row, answer_field), value)


def _normaliser(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown row kind {kind!r}; expected one of {KINDS}")
    return _NORMALISERS[kind]


@dataclasses.dataclass(frozen=True)
class _Where:
    source: str
    row: int
    answer_field: str = "answer"  # where a prompt row's ground truth is (dotted for nested objects)

    def error(self, field: str | None, reason: str, detail: str) -> RowError:
        return RowError(self.source, self.row, field, reason, detail)


def _normalise_sft(where: _Where, value: Any) -> dict[str, Any]:
    row = _as_object(where, value)
    messages = _conversation(where, row, "messages")
    _check_ends_with_trained_assistant(where, messages, "messages")
    return {"messages": messages}


def _normalise_preference(where: _Where, value: Any) -> dict[str, Any]:
    row = _as_object(where, value)
    chosen = _required(where, row, "chosen")
    rejected = _required(where, row, "rejected")
    # A `prompt` field means the string form, unless both responses are message lists.
    string_form = "prompt" in row and not (isinstance(chosen, list) and isinstance(rejected, list))
    if isinstance(chosen, list) and not string_form:
        if not isinstance(rejected, list):
            raise where.error(
                "rejected", "wrong_type", f"expected an array of messages like 'chosen', got {type_name(rejected)}"
            )
        chosen_messages = _conversation(where, row, "chosen")
        rejected_messages = _conversation(where, row, "rejected")
        _check_ends_with_trained_assistant(where, chosen_messages, "chosen")
        _check_ends_with_trained_assistant(where, rejected_messages, "rejected")
        _check_same_prompt(where, chosen_messages[:-1], rejected_messages[:-1])
        prompt = chosen_messages[:-1]
        chosen_text, rejected_text = chosen_messages[-1]["content"], rejected_messages[-1]["content"]
    elif isinstance(chosen, str) or string_form:
        if not isinstance(chosen, str):
            raise where.error(
                "chosen",
                "wrong_type",
                f"expected a string (the prompt + chosen + rejected form), got {type_name(chosen)}",
            )
        if not isinstance(rejected, str):
            raise where.error("rejected", "wrong_type", f"expected a string like 'chosen', got {type_name(rejected)}")
        prompt = [{"role": "user", "content": _prompt_string(where, row)}]
        chosen_text = _response_string(where, chosen, "chosen")
        rejected_text = _response_string(where, rejected, "rejected")
    else:
        raise where.error("chosen", "wrong_type", f"expected an array of messages or a string, got {type_name(chosen)}")
    if chosen_text == rejected_text:
        raise where.error(
            "rejected",
            "identical_responses",
            "is identical to 'chosen'; a preference pair needs two different responses",
        )
    return {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text, "margin": _margin(where, row)}


def _normalise_prompt(where: _Where, value: Any) -> dict[str, Any]:
    row = _as_object(where, value)
    # A conversation under 'messages', or under 'prompt' (DAPO-Math's and verl's layout).
    field = "messages" if row.get("messages") is not None else "prompt" if isinstance(row.get("prompt"), list) else None
    if field is not None:
        messages = _conversation(where, row, field)
        if messages[-1]["role"] != "user":
            raise where.error(
                f"{field}[{len(messages) - 1}].role",
                "bad_conversation_end",
                f"a prompt must end with a user turn, got '{messages[-1]['role']}'",
            )
        _check_turn_order(where, messages, field)
        return {"prompt": messages, "answer": _answer(where, row)}
    if row.get("prompt") is not None:
        return {"prompt": [{"role": "user", "content": _prompt_string(where, row)}], "answer": _answer(where, row)}
    raise where.error(
        "messages",
        "missing_field",
        "is missing: a prompt row needs 'messages' (a conversation ending in a user turn) or 'prompt' (a string)",
    )


_NORMALISERS = {"sft": _normalise_sft, "preference": _normalise_preference, "prompt": _normalise_prompt}


def _as_object(where: _Where, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise where.error(None, "wrong_type", f"expected an object with named fields, got {type_name(value)}")
    return value


def _required(where: _Where, row: dict[str, Any], field: str) -> Any:
    if field not in row:
        raise where.error(field, "missing_field", "is missing")
    if row[field] is None:
        raise where.error(field, "missing_field", "is null")
    return row[field]


def _conversation(where: _Where, row: dict[str, Any], field: str) -> list[Message]:
    value = _required(where, row, field)
    if not isinstance(value, list):
        raise where.error(field, "wrong_type", f"expected an array of messages, got {type_name(value)}")
    if not value:
        raise where.error(field, "empty_conversation", "has no messages")
    return [_message(where, message, f"{field}[{i}]") for i, message in enumerate(value)]


def _message(where: _Where, value: Any, field: str) -> Message:
    if not isinstance(value, dict):
        raise where.error(
            field, "wrong_type", f"expected a message object with 'role' and 'content', got {type_name(value)}"
        )
    role = _text(where, value.get("role"), f"{field}.role", present="role" in value)
    if role not in ROLES:
        raise where.error(
            f"{field}.role", "unknown_role", f"unknown role '{role}' (expected one of {', '.join(ROLES)})"
        )
    content = _text(where, value.get("content"), f"{field}.content", present="content" in value)
    return {"role": role, "content": content}


def _text(where: _Where, value: Any, field: str, *, present: bool = True) -> str:
    """A field that must be a string of valid Unicode (i.e. encodable as UTF-8)."""
    if value is None:
        raise where.error(field, "missing_field", "is null" if present else "is missing")
    if not isinstance(value, str):
        raise where.error(field, "wrong_type", f"expected a string, got {type_name(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # Lone surrogates: undecodable bytes or a bad \\ud800 escape.
            raise where.error(field, "invalid_utf8", f"text is not valid UTF-8 (at character {e.start})") from None
    return value


def _check_ends_with_trained_assistant(where: _Where, messages: list[Message], field: str) -> None:
    """The final turn is the trained response: a non-empty assistant turn (and turns in order)."""
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise where.error(
            f"{field}[{last}].role",
            "bad_conversation_end",
            f"the conversation must end with an assistant turn, got '{messages[last]['role']}'",
        )
    if not messages[last]["content"].strip():
        raise where.error(f"{field}[{last}].content", "empty_response", "the final assistant response is empty")
    _check_turn_order(where, messages, field)


def _check_turn_order(where: _Where, messages: list[Message], field: str) -> None:
    """Every assistant turn answers a user turn directly before it, as every chat format requires."""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise where.error(
                f"{field}[0].role", "bad_turn_order", "the conversation cannot start with an assistant turn"
            )
        previous = messages[i - 1]["role"]
        if previous != "user":
            raise where.error(
                f"{field}[{i}].role",
                "bad_turn_order",
                f"an assistant turn must directly follow a user turn, but this one follows '{previous}'",
            )


def _check_same_prompt(where: _Where, chosen_prompt: list[Message], rejected_prompt: list[Message]) -> None:
    for i, (chosen, rejected) in enumerate(zip(chosen_prompt, rejected_prompt, strict=False)):
        for key in ("role", "content"):
            if chosen[key] != rejected[key]:
                raise where.error(
                    f"rejected[{i}].{key}",
                    "prompt_mismatch",
                    f"chosen and rejected must share the prompt, but message {i} differs "
                    f"(chosen: {_preview(chosen[key])}, rejected: {_preview(rejected[key])})",
                )
    if len(chosen_prompt) != len(rejected_prompt):
        raise where.error(
            "rejected",
            "prompt_mismatch",
            f"chosen and rejected must share the prompt, but chosen has {len(chosen_prompt)} prompt "
            f"messages and rejected has {len(rejected_prompt)}",
        )


def _prompt_string(where: _Where, row: dict[str, Any]) -> str:
    prompt = _text(where, row.get("prompt"), "prompt", present="prompt" in row)
    if not prompt.strip():
        raise where.error("prompt", "empty_prompt", "the prompt is empty")
    return prompt


def _response_string(where: _Where, value: str, field: str) -> str:
    text = _text(where, value, field)
    if not text.strip():
        raise where.error(field, "empty_response", "the response is empty")
    return text


_FLOAT32_MAX = 3.4028234663852886e38  # margins are float32 on the device; a larger one would be inf there


def _answer(where: _Where, row: dict[str, Any]) -> str | None:
    """The optional ground truth of a prompt row (verifiable rewards compare responses with it), as text.

    A number is kept as it was written (``12``, ``0.5``); a boolean, a list or an empty string is refused
    here, not later when a reward function would silently score every response 0.
    """
    field = where.answer_field
    value: Any = row
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 1:  # some sets wrap a single ground truth in a list
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise where.error(field, "bad_type", f"expected a string or a number, got {type_name(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise where.error(field, "bad_value", f"must be finite, got {value}")
    text = str(value)
    if not text.strip():
        raise where.error(field, "empty_answer", "the answer is empty")
    return text


def _margin(where: _Where, row: dict[str, Any]) -> float:
    margin = row.get("margin")
    if margin is None:
        return 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise where.error("margin", "wrong_type", f"expected a number, got {type_name(margin)}")
    if not math.isfinite(margin) or abs(margin) > _FLOAT32_MAX:
        raise where.error("margin", "invalid_value", f"must be finite in float32 (|margin| <= 3.4e38), got {margin}")
    return float(margin)


def _preview(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
