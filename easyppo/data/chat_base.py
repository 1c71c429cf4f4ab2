"""What every chat format is: the ``ChatFormat`` interface, its encoded conversation, and the segment
helpers the formats share (see ``easyppo.data.chat`` for the formats and how they tokenise)."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from easyppo.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all_assistant", "last_assistant")

#: Bump when the output of a built-in format changes, so caches keyed by ``ChatFormat.fingerprint``
#: are invalidated.
FORMAT_VERSION = 1

#: A piece of a rendered conversation: a token id placed as is (a special token), or text to tokenise.
Piece = int | str


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    """Token ids of a whole conversation and a 0/1 loss mask of the same length."""

    ids: list[int]
    loss_mask: list[int]


@dataclasses.dataclass(frozen=True)
class Segment:
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


def encode_segment(tokenizer: Tokenizer, segment: Segment) -> list[int]:
    ids: list[int] = []
    follows_text = segment.continues_text
    for piece in merge_adjacent_text(segment.pieces):
        if isinstance(piece, int):
            ids.append(piece)
            follows_text = False
        elif piece:
            ids.extend(tokenizer.encode_continuation(piece) if follows_text else tokenizer.encode(piece))
            follows_text = True
    return ids


def merge_adjacent_text(pieces: Sequence[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


def validated(messages: Sequence[Mapping[str, Any]], *, final_role: str, what: str) -> list[dict[str, str]]:
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
    def _prompt_segments(self, messages: list[dict[str, str]]) -> list[Segment]:
        """Segments of a validated prompt (ending with a user turn) up to the assistant header."""

    @abc.abstractmethod
    def _response_segment(self, content: str) -> Segment:
        """The response segment of one assistant turn: its content and end-of-turn token."""

    def _final_response_segment(self, messages: list[dict[str, str]]) -> Segment:
        """The response segment of the last message of a validated conversation (an assistant turn)."""
        return self._response_segment(messages[-1]["content"])

    def _template_text(self) -> str:
        return ""

    @property
    def hf_chat_template(self) -> str | None:
        """This format as a Hugging Face Jinja chat template (written into exports), if it has one."""
        from easyppo.data.chat_templates import BY_FORMAT

        return BY_FORMAT.get(self.name)

    @property
    def fingerprint(self) -> str:
        """A hash of the tokenizer, the format and its template: equal fingerprints, equal ids."""
        key = json.dumps([self.name, FORMAT_VERSION, self.tokenizer.fingerprint, self._template_text()])
        return hashlib.sha256(key.encode()).hexdigest()

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """BOS, every turn, then the assistant header: the tokens a rollout continues from.

        ``messages`` must end with a user turn.
        """
        segments = self._prompt_segments(validated(messages, final_role="user", what="a prompt"))
        return [token for segment in segments for token in encode_segment(self.tokenizer, segment)]

    def encode_response(self, content: str) -> list[int]:
        """The assistant ``content`` followed by the end-of-turn token, as it follows a prompt."""
        if not isinstance(content, str):
            raise ValueError(f"response content must be a string, got {type(content).__name__}")
        return encode_segment(self.tokenizer, self._response_segment(content))

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
        messages = validated(messages, final_role="assistant", what="a conversation")
        last = len(messages) - 1
        final_response = dataclasses.replace(self._final_response_segment(messages), response_turn=last)
        ids: list[int] = []
        loss_mask: list[int] = []
        trained_turns = {i for i in range(last + 1) if train_on == "all_assistant" or i == last}
        for segment in self._prompt_segments(messages[:last]) + [final_response]:
            segment_ids = encode_segment(self.tokenizer, segment)
            trained = segment.response_turn in trained_turns
            ids.extend(segment_ids)
            loss_mask.extend([int(trained)] * len(segment_ids))
        return EncodedConversation(ids=ids, loss_mask=loss_mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tokenizer={self.tokenizer.source!r})"
