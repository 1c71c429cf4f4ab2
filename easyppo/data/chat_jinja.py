"""The tokenizer's own Jinja chat template as a ``ChatFormat``: rendered in a sandbox exactly as
``transformers``' ``apply_chat_template`` renders it, with the response region found by rendering twice."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from easyppo.data.chat_base import (
    ChatFormat,
    Piece,
    Segment,
)
from easyppo.data.tokenizer import Tokenizer

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

    @property
    def hf_chat_template(self) -> str | None:
        return self.template

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

    def _region_text(self, segment: Segment) -> str:
        return "".join(p if isinstance(p, str) else self.tokenizer.id_to_token(p) for p in segment.pieces)

    def _response_from_renderings(self, head: str, full: str, where: str) -> Segment:
        if not full.startswith(head):
            raise ValueError(
                f"the chat template is not prefix-stable: {where}, the rendering with the assistant turn does not "
                "start with the rendering of the prompt with add_generation_prompt=True"
            )
        head_pieces = self._split_specials(head)
        ends_in_text = bool(head_pieces) and isinstance(head_pieces[-1], str)
        return Segment(self._split_specials(full[len(head) :]), continues_text=ends_in_text)

    def _response_segment(self, content: str) -> Segment:
        full = self.render([*_PROBE_PROMPT, {"role": "assistant", "content": content}], add_generation_prompt=False)
        return self._response_from_renderings(self._probe_head, full, "after a one-message prompt")

    def _prompt_segments(self, messages: list[dict[str, str]]) -> list[Segment]:
        text = self.render(messages, add_generation_prompt=True)
        lead: tuple[Piece, ...] = () if text.startswith(self._bos_text) else (self.tokenizer.bos_id,)
        segments: list[Segment] = []
        cursor = 0
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                head_end, turn_end, response = self._checked_response(messages, index, text)
                segments.append(Segment(lead + self._split_specials(text[cursor:head_end])))
                segments.append(dataclasses.replace(response, response_turn=index))
                lead, cursor = (), turn_end
        segments.append(Segment(lead + self._split_specials(text[cursor:])))
        return segments

    def _final_response_segment(self, messages: list[dict[str, str]]) -> Segment:
        text = self.render(messages, add_generation_prompt=False)
        return self._checked_response(messages, len(messages) - 1, text)[2]

    def _checked_response(self, messages: list[dict[str, str]], index: int, text: str) -> tuple[int, int, Segment]:
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
