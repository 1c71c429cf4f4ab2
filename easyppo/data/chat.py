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

from easyppo.data.chat_base import (
    ROLES,
    TRAIN_ON,
    ChatFormat,
    EncodedConversation,
    Piece,
    Segment,
)
from easyppo.data.chat_jinja import JinjaChatFormat
from easyppo.data.tokenizer import Tokenizer

__all__ = ["ROLES", "TRAIN_ON", "ChatFormat", "EncodedConversation", "JinjaChatFormat", "Piece"]


class _TurnTemplateFormat(ChatFormat):
    """A format given by fixed pieces around each message: BOS, then per turn a header and a body."""

    @abc.abstractmethod
    def _header(self, role: str, previous_role: str | None) -> list[Piece]:
        """Pieces opening a turn of ``role`` (including any separator after the previous turn)."""

    @abc.abstractmethod
    def _body(self, role: str, content: str) -> list[Piece]:
        """Pieces of a system or user turn after its header."""

    def _prompt_segments(self, messages: list[dict[str, str]]) -> list[Segment]:
        segments: list[Segment] = []
        pieces: list[Piece] = [self.tokenizer.bos_id]
        previous_role = None
        for index, message in enumerate(messages):
            role = message["role"]
            pieces += self._header(role, previous_role)
            if role == "assistant":
                segments.append(Segment(tuple(pieces)))
                segments.append(dataclasses.replace(self._response_segment(message["content"]), response_turn=index))
                pieces = []
            else:
                pieces += self._body(role, message["content"])
            previous_role = role
        pieces += self._header("assistant", previous_role)
        segments.append(Segment(tuple(pieces)))
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

    def _response_segment(self, content: str) -> Segment:
        return Segment((content.strip(), self.tokenizer.eos_id), continues_text=self._response_continues_text)


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

    def _response_segment(self, content: str) -> Segment:
        return Segment((content.strip(), self._end_of_turn_id), continues_text=self._response_continues_text)


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

    def _response_segment(self, content: str) -> Segment:
        return Segment((content, self.tokenizer.eos_id), continues_text=self._response_continues_text)


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
