"""The two tokenizer engines behind ``easyppo.data.tokenizer.Tokenizer``: SentencePiece models and
Hugging Face ``tokenizers`` JSON, each able to encode a text that starts a run of text and one that
continues it (without the prefix space), which chat formats need to reproduce whole-text tokenisation."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

SPECIAL_NAMES = ("bos", "eos", "pad")


class Backend(Protocol):
    """What :class:`Tokenizer` needs from a tokenisation library."""

    kind: str
    model_bytes: bytes
    vocab_size: int
    special_tokens: Mapping[str, int]
    default_special_ids: Mapping[str, int | None]

    def encode(self, text: str, *, continuation: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool, continuation: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, token_id: int) -> str: ...

    def text_can_produce(self, token_id: int) -> bool: ...


class SentencePieceBackend:
    """A sentencepiece model, plus a copy of it without the dummy prefix for continuations."""

    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes, source: str) -> None:
        import sentencepiece
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2

        self.model_bytes = model_bytes
        self._source = source
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(model_bytes)
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
        except (DecodeError, RuntimeError) as e:
            raise ValueError(f"{source} is not a valid sentencepiece model: {e}") from e
        # With byte fallback every character has a byte encoding, so <unk> is never produced.
        self._byte_fallback = proto.trainer_spec.byte_fallback
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_continuation = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.vocab_size = self._sp.get_piece_size()
        self.special_tokens = {self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)}
        self._special_ids = frozenset(self.special_tokens.values())
        self.default_special_ids = {
            name: (i if i >= 0 else None)
            for name, i in (("bos", self._sp.bos_id()), ("eos", self._sp.eos_id()), ("pad", self._sp.pad_id()))
        }

    def __reduce__(self):  # The processors pickle, but rebuilding from the bytes is simpler and exact.
        return (type(self), (self.model_bytes, self._source))

    def encode(self, text: str, *, continuation: bool) -> list[int]:
        processor = self._sp_continuation if continuation else self._sp
        return processor.encode(text)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool, continuation: bool) -> str:
        # Decode each run of ordinary tokens on its own: a run that follows a control token was encoded
        # as the start of a text (see chat.py), so its dummy-prefix space must be dropped again. Only a
        # leading run of continuation ids keeps its first space.
        parts: list[str] = []
        run: list[int] = []
        processor = self._sp_continuation if continuation else self._sp
        for token_id in ids:
            if token_id in self._special_ids:
                if run:
                    parts.append(processor.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._sp.id_to_piece(token_id))
                processor = self._sp
            else:
                run.append(token_id)
        if run:
            parts.append(processor.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces; only the unk piece itself really maps there.
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def text_can_produce(self, token_id: int) -> bool:
        if self._sp.is_control(token_id) or self._sp.is_unused(token_id):
            return False
        return not (self._sp.is_unknown(token_id) and self._byte_fallback)


class HFTokenizersBackend:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library."""

    kind = "tokenizers"

    def __init__(self, model_bytes: bytes, source: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.model_bytes = model_bytes
        self._source = source
        try:
            text = model_bytes.decode("utf-8")
            spec = json.loads(text)
            self._tokenizer = HFTokenizer.from_str(text)
        except Exception as e:  # json / UnicodeDecodeError, or the tokenizers library's own exception
            raise ValueError(f"{source} is not a valid tokenizer.json: {e}") from e
        continuation_spec = _without_prefix_space(spec)
        self._continuation = (
            self._tokenizer if continuation_spec == spec else HFTokenizer.from_str(json.dumps(continuation_spec))
        )
        for tokenizer in (self._tokenizer, self._continuation):
            tokenizer.encode_special_tokens = True  # Text is text: "<|eot_id|>" typed by a user stays text.
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.special_tokens = {
            token.content: i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special
        }
        self._special_ids = frozenset(self.special_tokens.values())
        self.default_special_ids = {name: None for name in SPECIAL_NAMES}

    def __reduce__(self):  # encode_special_tokens is not part of the JSON, so rebuild rather than pickle.
        return (type(self), (self.model_bytes, self._source))

    def encode(self, text: str, *, continuation: bool) -> list[int]:
        tokenizer = self._continuation if continuation else self._tokenizer
        return tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool, continuation: bool) -> str:
        tokenizer = self._continuation if continuation else self._tokenizer
        return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id)

    def text_can_produce(self, token_id: int) -> bool:
        return token_id not in self._special_ids


def _without_prefix_space(spec: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer.json spec with every "prepend a space" step, and its undoing in decoding, switched off."""
    spec = copy.deepcopy(spec)
    spec["normalizer"] = _drop_prepend_normalizer(spec.get("normalizer"))
    spec["pre_tokenizer"] = _never_prepend(spec.get("pre_tokenizer"))
    spec["decoder"] = _keep_leading_space(spec.get("decoder"))
    return spec


def _drop_prepend_normalizer(normalizer: dict[str, Any] | None) -> dict[str, Any] | None:
    if normalizer is None or normalizer.get("type") == "Prepend":
        return None
    if normalizer.get("type") == "Sequence":
        kept = [_drop_prepend_normalizer(n) for n in normalizer["normalizers"]]
        return {**normalizer, "normalizers": [n for n in kept if n is not None]}
    return normalizer


def _keep_leading_space(decoder: dict[str, Any] | None) -> dict[str, Any] | None:
    if decoder is None:
        return None
    kind = decoder.get("type")
    if kind == "Metaspace":
        return _never_prepend(decoder)
    if kind == "Sequence":
        kept = [_keep_leading_space(d) for d in decoder["decoders"]]
        return {**decoder, "decoders": [d for d in kept if d is not None]}
    if kind == "Strip" and decoder.get("start", 0) > 0:  # Llama 2's decoder strips the prepended space.
        return None
    return decoder


def _never_prepend(pre_tokenizer: dict[str, Any] | None) -> dict[str, Any] | None:
    if pre_tokenizer is None:
        return None
    kind = pre_tokenizer.get("type")
    if kind == "Metaspace":
        updated = {**pre_tokenizer, "prepend_scheme": "never"}
        if "add_prefix_space" in updated:
            updated["add_prefix_space"] = False
        return updated
    if kind == "ByteLevel":
        return {**pre_tokenizer, "add_prefix_space": False}
    if kind == "Sequence":
        return {**pre_tokenizer, "pretokenizers": [_never_prepend(p) for p in pre_tokenizer["pretokenizers"]]}
    return pre_tokenizer
