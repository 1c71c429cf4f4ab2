"""Chat formats: messages -> token ids and loss masks, with the rollout prompt an exact prefix.

Four formats (see docs/chat_formats.md for worked examples):

* ``"tulu"``: Tulu 2 / open-instruct, ``<|user|>\\n...\\n<|assistant|>\\n...</s>``.
* ``"llama3"``: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``.
* ``"tokenizer"``: the tokenizer's own Jinja chat template.
* ``"plain"``: no markup; message contents back to back, EOS after each assistant turn.

**The prefix invariant.** PPO samples a response after ``encode_prompt(m[:-1])`` and later scores those
very tokens as a conversation; DPO scores ``prompt + chosen`` against ``prompt + rejected``. So for every
conversation ``m`` ending in an assistant turn::

    encode_prompt(m[:-1]) + encode_response(m[-1]["content"]) == encode_conversation(m).ids

Tokenising the rendered conversation in one go cannot promise this: sentencepiece may merge characters
across the prompt/response boundary, and adds a dummy-prefix space to the start of whatever string it
is given. Instead every format describes a conversation as a list of *segments* (prompt segments and
one response segment per assistant turn) and tokenises each segment on its own:

* ``encode_conversation(m)`` is literally the segments of ``encode_prompt(m[:-1])`` followed by the
  segment of ``encode_response(m[-1]["content"])``: the same code builds both.
* A segment's tokens depend on nothing outside it. Text opening a prompt segment always follows a
  special token (BOS, or the end-of-turn token of the response before it) and is encoded as the start
  of a text; the text opening a response segment continues the prompt's text and is encoded as a
  continuation (``Tokenizer.encode_continuation``), whatever the prompt was.

Inside a segment adjacent text is tokenised in one piece, so the ids equal whole-text tokenisation
of the rendered conversation wherever nothing merges across a prompt/response boundary; with Llama
vocabularies the boundaries sit next to newlines and control tokens, where nothing merges.

The loss mask is 1 exactly on response segments (the assistant content and its end-of-turn token).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.sandbox

from easyppo.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all_assistant", "last_assistant")

#: Bump when the output of a built-in format changes, so caches keyed by ``ChatFormat.fingerprint``
#: are invalidated.
_FORMAT_VERSION = 1

#: A piece of a rendered conversation: a token id placed as is (a special token), or text to tokenise.
Piece = int | str


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    """Token ids of a whole conversation and a 0/1 loss mask of the same length."""

    ids: list[int]
    loss_mask: list[int]


@dataclasses.dataclass(frozen=True)
class _Segment:
    """Pieces tokenised together, independently of everything around them.

    Attributes:
      pieces: special-token ids and texts, in order.
      response_turn: for a response segment, the index of its assistant message; None for prompt.
      continues_text: whether the first text continues text before the segment (encoded without a
        dummy-prefix space). True for responses that follow their header's text.
    """

    pieces: tuple[Piece, ...]
    response_turn: int | None = None
    continues_text: bool = False


def _encode_segment(tokenizer: Tokenizer, segment: _Segment) -> list[int]:
    ids: list[int] = []
    follows_text = segment.continues_text
    for piece in _merge_adjacent_text(segment.pieces):
        if isinstance(piece, int):
            ids.append(piece)
            follows_text = False
        elif piece:
            ids.extend(tokenizer.encode_continuation(piece) if follows_text else tokenizer.encode(piece))
            follows_text = True
    return ids


def _merge_adjacent_text(pieces: Sequence[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


def _validated(messages: Sequence[Mapping[str, Any]], *, final_role: str, what: str) -> list[dict[str, str]]:
    """Plain {"role", "content"} dicts, after checking roles, contents and turn order."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"{what} must be a list of {{'role', 'content'}} messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{what} has no messages")
    checked: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"message {index}: expected a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
        if role == "assistant" and (not checked or checked[-1]["role"] != "user"):
            raise ValueError(f"message {index}: an assistant turn must directly follow a user turn")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != final_role:
        article = "an" if final_role == "assistant" else "a"
        raise ValueError(
            f"{what} must end with {article} {final_role} turn, but its last message is {checked[-1]['role']!r}"
        )
    return checked


class ChatFormat(abc.ABC):
    """Encodes prompts, responses and whole conversations of one chat format.

    Subclasses describe a format by two methods, ``_prompt_segments`` and ``_response_segment``; the
    encoders below combine them so that the prefix invariant (module docstring) holds for every format.
    """

    name: ClassVar[str]
    #: Whether a response's text continues the text of the assistant header before it (and so is
    #: encoded without a dummy-prefix space). True for the built-in formats.
    _response_continues_text: bool = True

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    @abc.abstractmethod
    def end_of_turn_id(self) -> int:
        """The id that closes an assistant turn: sampling stops there and responses end with it."""

    @abc.abstractmethod
    def _prompt_segments(self, messages: list[dict[str, str]]) -> list[_Segment]:
        """Segments of a validated prompt (ending with a user turn) up to the assistant header."""

    @abc.abstractmethod
    def _response_segment(self, content: str) -> _Segment:
        """The response segment of one assistant turn: its content and end-of-turn token."""

    def _final_response_segment(self, messages: list[dict[str, str]]) -> _Segment:
        """The response segment of the last message of a validated conversation (an assistant turn)."""
        return self._response_segment(messages[-1]["content"])

    def _template_text(self) -> str:
        return ""

    @property
    def fingerprint(self) -> str:
        """A hash of the tokenizer, the format and its template: equal fingerprints, equal ids."""
        key = json.dumps([self.name, _FORMAT_VERSION, self.tokenizer.fingerprint, self._template_text()])
        return hashlib.sha256(key.encode()).hexdigest()

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """BOS, every turn, then the assistant header: the tokens a rollout continues from.

        ``messages`` must end with a user turn.
        """
        segments = self._prompt_segments(_validated(messages, final_role="user", what="a prompt"))
        return [token for segment in segments for token in _encode_segment(self.tokenizer, segment)]

    def encode_response(self, content: str) -> list[int]:
        """The assistant ``content`` followed by the end-of-turn token, as it follows a prompt."""
        if not isinstance(content, str):
            raise ValueError(f"response content must be a string, got {type(content).__name__}")
        return _encode_segment(self.tokenizer, self._response_segment(content))

    def decode_response(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of response ids, such as a sampled rollout: the inverse of :meth:`encode_response`.

        Unlike a plain ``tokenizer.decode`` it keeps a leading space the response really has.
        """
        return self.tokenizer.decode(ids, skip_special_tokens, continuation=self._response_continues_text)

    def encode_conversation(
        self, messages: Sequence[Mapping[str, Any]], *, train_on: str = "all_assistant"
    ) -> EncodedConversation:
        """Ids of a conversation ending with an assistant turn, and its loss mask.

        Args:
          messages: ``[{"role": ..., "content": ...}, ...]``; every assistant turn directly follows a
            user turn, and the last message is an assistant turn.
          train_on: ``"all_assistant"`` puts loss on every assistant turn, ``"last_assistant"`` on the
            final one only (preference data). Trained tokens are the content and end-of-turn token.
        """
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        messages = _validated(messages, final_role="assistant", what="a conversation")
        last = len(messages) - 1
        final_response = dataclasses.replace(self._final_response_segment(messages), response_turn=last)
        ids: list[int] = []
        loss_mask: list[int] = []
        trained_turns = {i for i in range(last + 1) if train_on == "all_assistant" or i == last}
        for segment in self._prompt_segments(messages[:last]) + [final_response]:
            segment_ids = _encode_segment(self.tokenizer, segment)
            trained = segment.response_turn in trained_turns
            ids.extend(segment_ids)
            loss_mask.extend([int(trained)] * len(segment_ids))
        return EncodedConversation(ids=ids, loss_mask=loss_mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tokenizer={self.tokenizer.source!r})"


class _TurnTemplateFormat(ChatFormat):
    """A format given by fixed pieces around each message: BOS, then per turn a header and a body."""

    @abc.abstractmethod
    def _header(self, role: str, previous_role: str | None) -> list[Piece]:
        """Pieces opening a turn of ``role`` (including any separator after the previous turn)."""

    @abc.abstractmethod
    def _body(self, role: str, content: str) -> list[Piece]:
        """Pieces of a system or user turn after its header."""

    def _prompt_segments(self, messages: list[dict[str, str]]) -> list[_Segment]:
        segments: list[_Segment] = []
        pieces: list[Piece] = [self.tokenizer.bos_id]
        previous_role = None
        for index, message in enumerate(messages):
            role = message["role"]
            pieces += self._header(role, previous_role)
            if role == "assistant":
                segments.append(_Segment(tuple(pieces)))
                segments.append(dataclasses.replace(self._response_segment(message["content"]), response_turn=index))
                pieces = []
            else:
                pieces += self._body(role, message["content"])
            previous_role = role
        pieces += self._header("assistant", previous_role)
        segments.append(_Segment(tuple(pieces)))
        return segments


class TuluChatFormat(_TurnTemplateFormat):
    """Tulu 2 / open-instruct: ``<s><|user|>\\nHi\\n<|assistant|>\\nHello</s>\\n<|user|>\\n...``.

    Each role tag is followed by a newline, each system/user content by a newline, each assistant
    content by EOS, and a newline separates that EOS from the next turn. Contents are stripped of
    surrounding whitespace, as in the code that trained Tulu 2 (docs/chat_formats.md has the sources).
    """

    name = "tulu"

    @property
    def end_of_turn_id(self) -> int:
        return self.tokenizer.eos_id

    def _header(self, role: str, previous_role: str | None) -> list[Piece]:
        separator = "\n" if previous_role == "assistant" else ""
        return [f"{separator}<|{role}|>\n"]

    def _body(self, role: str, content: str) -> list[Piece]:
        return [content.strip() + "\n"]

    def _response_segment(self, content: str) -> _Segment:
        return _Segment((content.strip(), self.tokenizer.eos_id), continues_text=self._response_continues_text)


class Llama3ChatFormat(_TurnTemplateFormat):
    """Llama 3 Instruct: ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>...``.

    Contents are stripped of surrounding whitespace, as Meta's template does. Turns end with
    ``<|eot_id|>`` (not the tokenizer's EOS), so that is this format's ``end_of_turn_id``.
    """

    name = "llama3"
    _START_HEADER, _END_HEADER, _END_OF_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        needed = (self._START_HEADER, self._END_HEADER, self._END_OF_TURN)
        missing = [token for token in needed if token not in tokenizer.special_tokens]
        if missing:
            raise ValueError(
                f"the llama3 chat format needs the special tokens {', '.join(missing)}, which {tokenizer.source} "
                "does not have (is this a Llama 3 tokenizer?)"
            )
        self._start_header_id = tokenizer.special_tokens[self._START_HEADER]
        self._end_header_id = tokenizer.special_tokens[self._END_HEADER]
        self._end_of_turn_id = tokenizer.special_tokens[self._END_OF_TURN]

    @property
    def end_of_turn_id(self) -> int:
        return self._end_of_turn_id

    def _header(self, role: str, previous_role: str | None) -> list[Piece]:
        return [self._start_header_id, role, self._end_header_id, "\n\n"]

    def _body(self, role: str, content: str) -> list[Piece]:
        return [content.strip(), self._end_of_turn_id]

    def _response_segment(self, content: str) -> _Segment:
        return _Segment((content.strip(), self._end_of_turn_id), continues_text=self._response_continues_text)


class PlainChatFormat(_TurnTemplateFormat):
    """No markup: BOS, then the contents back to back, EOS after each assistant turn.

    Contents are used verbatim, so the data carries its own spacing (``"Q: 2+2?\\nA:"`` then ``" 4"``).
    """

    name = "plain"

    @property
    def end_of_turn_id(self) -> int:
        return self.tokenizer.eos_id

    def _header(self, role: str, previous_role: str | None) -> list[Piece]:
        return []

    def _body(self, role: str, content: str) -> list[Piece]:
        return [content]

    def _response_segment(self, content: str) -> _Segment:
        return _Segment((content, self.tokenizer.eos_id), continues_text=self._response_continues_text)


# Any one-message prompt will do: an assistant turn must render the same after every prompt (checked).
_PROBE_PROMPT = ({"role": "user", "content": "Hi"},)


class JinjaChatFormat(ChatFormat):
    """The tokenizer's own Jinja chat template (``tokenizer_config.json`` / ``chat_template.jinja``).

    The template only renders text, so segments are recovered by rendering prefixes: the prompt up to
    assistant turn ``i`` is ``render(m[:i], add_generation_prompt=True)`` and the turn ends where
    ``render(m[:i + 1])`` ends. Those renderings must be prefixes of the whole rendering, and an
    assistant turn must render the same whatever precedes it and end with a special token (checked,
    with a ValueError otherwise). Special-token strings in the rendered text, including any inside
    message contents, become their ids, as in ``transformers``' ``apply_chat_template``. BOS is
    prepended when the template does not render it itself.

    Rendering matches ``transformers`` (sandboxed Jinja with ``trim_blocks`` and ``lstrip_blocks``,
    ``raise_exception``, ``tojson``) except that ``strftime_now`` is left undefined, so templates fall
    back to their fixed default date and the tokenised data does not depend on the day it was made.
    """

    name = "tokenizer"

    def __init__(self, tokenizer: Tokenizer, template: str | None = None) -> None:
        super().__init__(tokenizer)
        self.template = tokenizer.chat_template if template is None else template
        if not self.template:
            raise ValueError(
                f"the 'tokenizer' chat format needs a chat template, and {tokenizer.source} has none; "
                "pass chat_template= to load_tokenizer or choose the tulu, llama3 or plain format"
            )
        self._compiled = _compile_template(self.template)
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._bos_text = tokenizer.id_to_token(tokenizer.bos_id)
        self._probe_head = self.render(list(_PROBE_PROMPT), add_generation_prompt=True)
        probe = self._response_segment("Hello")
        if not probe.pieces or not isinstance(probe.pieces[-1], int):
            raise ValueError(
                "the chat template must end an assistant turn with a special token (such as EOS or <|eot_id|>) "
                f"for sampling to stop on; it renders the turn as {self._region_text(probe)!r}"
            )
        self._end_of_turn_id = probe.pieces[-1]
        self._response_continues_text = probe.continues_text

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None  # Compiled Jinja templates do not pickle; recompiled on first use.
        return state

    @property
    def end_of_turn_id(self) -> int:
        return self._end_of_turn_id

    def _template_text(self) -> str:
        return self.template

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool) -> str:
        """The template's text for ``messages`` (what ``apply_chat_template(tokenize=False)`` gives)."""
        if self._compiled is None:
            self._compiled = _compile_template(self.template)
        tokenizer = self.tokenizer
        try:
            return self._compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_text,
                eos_token=tokenizer.id_to_token(tokenizer.eos_id),
                pad_token=tokenizer.id_to_token(tokenizer.pad_id),
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template of {tokenizer.source} failed to render: {e}") from e

    def _split_specials(self, text: str) -> tuple[Piece, ...]:
        if self._special_pattern is None:
            return (text,)
        pieces: list[Piece] = []
        cursor = 0
        for match in self._special_pattern.finditer(text):
            pieces.append(text[cursor : match.start()])
            pieces.append(self.tokenizer.special_tokens[match.group()])
            cursor = match.end()
        pieces.append(text[cursor:])
        return tuple(p for p in pieces if p != "")

    def _region_text(self, segment: _Segment) -> str:
        return "".join(p if isinstance(p, str) else self.tokenizer.id_to_token(p) for p in segment.pieces)

    def _response_from_renderings(self, head: str, full: str, where: str) -> _Segment:
        if not full.startswith(head):
            raise ValueError(
                f"the chat template is not prefix-stable: {where}, the rendering with the assistant turn does not "
                "start with the rendering of the prompt with add_generation_prompt=True"
            )
        head_pieces = self._split_specials(head)
        ends_in_text = bool(head_pieces) and isinstance(head_pieces[-1], str)
        return _Segment(self._split_specials(full[len(head) :]), continues_text=ends_in_text)

    def _response_segment(self, content: str) -> _Segment:
        full = self.render([*_PROBE_PROMPT, {"role": "assistant", "content": content}], add_generation_prompt=False)
        return self._response_from_renderings(self._probe_head, full, "after a one-message prompt")

    def _prompt_segments(self, messages: list[dict[str, str]]) -> list[_Segment]:
        text = self.render(messages, add_generation_prompt=True)
        lead: tuple[Piece, ...] = () if text.startswith(self._bos_text) else (self.tokenizer.bos_id,)
        segments: list[_Segment] = []
        cursor = 0
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                head_end, turn_end, response = self._checked_response(messages, index, text)
                segments.append(_Segment(lead + self._split_specials(text[cursor:head_end])))
                segments.append(dataclasses.replace(response, response_turn=index))
                lead, cursor = (), turn_end
        segments.append(_Segment(lead + self._split_specials(text[cursor:])))
        return segments

    def _final_response_segment(self, messages: list[dict[str, str]]) -> _Segment:
        text = self.render(messages, add_generation_prompt=False)
        return self._checked_response(messages, len(messages) - 1, text)[2]

    def _checked_response(self, messages: list[dict[str, str]], index: int, text: str) -> tuple[int, int, _Segment]:
        """Where assistant turn ``index`` starts and ends in ``text``, and its (context-free) segment."""
        head = self._rendered_prefix(messages[:index], text, add_generation_prompt=True)
        full = self._rendered_prefix(messages[: index + 1], text, add_generation_prompt=False)
        response = self._response_segment(messages[index]["content"])
        if self._response_from_renderings(head, full, f"at message {index}") != response:
            raise ValueError(
                f"the chat template renders the assistant turn at message {index} differently from the same turn "
                "after a one-message prompt, so its tokens would depend on the conversation before it"
            )
        return len(head), len(full), response

    def _rendered_prefix(self, messages: list[dict[str, str]], text: str, *, add_generation_prompt: bool) -> str:
        rendered = self.render(messages, add_generation_prompt=add_generation_prompt)
        if not text.startswith(rendered):
            raise ValueError(
                f"the chat template is not prefix-stable: rendering the first {len(messages)} messages "
                f"(add_generation_prompt={add_generation_prompt}) does not give a prefix of the rendering of the "
                "whole conversation, so it cannot be cut into prompt and response"
            )
        return rendered


def _compile_template(template: str) -> jinja2.Template:
    try:
        return _jinja_environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e}") from e


@functools.cache
def _jinja_environment() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    return env


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON, as transformers gives.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


_FORMATS: dict[str, type[ChatFormat]] = {
    "tulu": TuluChatFormat,
    "llama3": Llama3ChatFormat,
    "tokenizer": JinjaChatFormat,
    "plain": PlainChatFormat,
}
FORMAT_NAMES = tuple(_FORMATS)


def make_chat_format(name: str, tokenizer: Tokenizer) -> ChatFormat:
    """The chat format called ``name`` ("tulu", "llama3", "tokenizer" or "plain") over ``tokenizer``."""
    try:
        format_cls = _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown chat format {name!r}; choose one of {', '.join(FORMAT_NAMES)}") from None
    return format_cls(tokenizer)


def stop_token_ids(chat_format: ChatFormat, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids that end an assistant turn when sampling in ``chat_format``: its end-of-turn token
    (Llama 3's ``<|eot_id|>``) and the tokenizer's EOS. The one answer for PPO and ``easyppo generate``."""
    return tuple(dict.fromkeys((chat_format.end_of_turn_id, tokenizer.eos_id)))
