"""One tokenizer interface over sentencepiece models (Llama 2, Tulu 2) and `tokenizer.json` (Llama 3).

``load_tokenizer(path)`` accepts a sentencepiece ``.model`` file, a Hugging Face ``tokenizer.json``, or
a Hugging Face tokenizer directory, on local disk or ``gs://`` (every read goes through
``etils.epath``). ``tokenizer.json`` is read with the ``tokenizers`` library, so nothing here imports
``transformers``.

Three decisions shape the interface:

* **Special ids are explicit.** BOS, EOS and pad come from the arguments, else from the directory's
  ``tokenizer_config.json`` / ``special_tokens_map.json``, else from the sentencepiece model itself,
  and it is an error when one is still missing. Pad is checked harder than the others: it may not
  equal BOS, EOS or any token that text can encode to, because code that finds padding by id (strip
  pads after sampling, find the last real token for a reward) would then silently eat real tokens.
  ``allow_pad_as_real_token=True`` accepts such a pad when that is really meant.
* **Text is always text.** ``encode`` never turns a special-token string inside the text (say a user
  who types ``"</s>"``) into a control id. Chat formats insert control ids themselves.
* **Start vs continuation.** Sentencepiece (and the Metaspace / Prepend steps of a Llama 2
  ``tokenizer.json``) prepends a "dummy prefix" space to each string it encodes. ``encode`` is the
  tokenisation of a text that starts a run of text (it gets the prefix), ``encode_continuation`` the
  tokenisation of a text that directly continues earlier text (no prefix). Chat formats tokenise
  their pieces separately and need both to reproduce whole-text tokenisation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from easyppo.data import tokenizer_backends as backends

SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"

_SPECIAL_NAMES = backends.SPECIAL_NAMES

#: How a caller names a special token: an id, a token string looked up in the vocabulary, or None
#: for "take it from the tokenizer files".
SpecialTokenArg = int | str | None


class Tokenizer:
    """Token ids for text, with explicit special ids. Build one with :func:`load_tokenizer`.

    Attributes:
      vocab_size: one more than the largest token id (model embeddings may be larger, never smaller).
      bos_id, eos_id, pad_id: the special ids, validated (see :func:`load_tokenizer`).
      chat_template: the Jinja chat template shipped with the tokenizer, or None.
      special_tokens: token string -> id for the control tokens that text never encodes to.
      source: where the tokenizer was loaded from, for error messages.
      fingerprint: a hash of the model bytes and the special ids (not of the path); equal
        fingerprints mean equal ids for every text, so it can key caches of tokenised data.
      vocabulary: (backend kind, hash of the model bytes alone): what ``vocabulary_at`` reports for a
        model directory, to tell whether a model was trained with this tokenizer's ids.
    """

    def __init__(
        self,
        backend: backends.Backend,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        allow_pad_as_real_token: bool = False,
        chat_template: str | None = None,
        source: str,
    ) -> None:
        self._backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.chat_template = chat_template
        self.source = source
        _check_special_ids(self, allow_pad_as_real_token=allow_pad_as_real_token)
        digest = hashlib.sha256()
        digest.update(backend.kind.encode())
        digest.update(backend.model_bytes)
        digest.update(json.dumps({"bos": bos_id, "eos": eos_id, "pad": pad_id}).encode())
        self.fingerprint = digest.hexdigest()
        self.vocabulary = (backend.kind, hashlib.sha256(backend.model_bytes).hexdigest())

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._backend.special_tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the start of a text (with any dummy-prefix space); no BOS/EOS."""
        return self._backend.encode(text, continuation=False)

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of ``text`` that directly continues earlier text (no dummy-prefix space)."""
        return self._backend.encode(text, continuation=True)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, *, continuation: bool = False) -> str:
        """Text of ``ids``; special tokens are dropped, or written as their token strings.

        ``continuation=True`` decodes ids made by :meth:`encode_continuation`: a leading space is then
        real text, not a dummy prefix to remove (so ``" 4"`` survives the round trip).
        """
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary of {self.source} (size {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens, continuation=continuation)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (e.g. ``"<|eot_id|>"``), or None if there is no such token."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` (e.g. ``"▁Paris"`` or ``"</s>"``)."""
        return self._backend.id_to_token(token_id)

    def text_can_produce(self, token_id: int) -> bool:
        """Whether encoding some text can yield ``token_id`` (False for control and reserved tokens)."""
        return self._backend.text_can_produce(token_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, backend={self._backend.kind}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


def _check_special_ids(tokenizer: Tokenizer, *, allow_pad_as_real_token: bool) -> None:
    for name in ("bos_id", "eos_id", "pad_id"):
        value = getattr(tokenizer, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < tokenizer.vocab_size:
            raise ValueError(
                f"{tokenizer.source}: {name}={value!r} is not a token id of this tokenizer "
                f"(ids are 0..{tokenizer.vocab_size - 1})"
            )
    if allow_pad_as_real_token:
        return
    pad = tokenizer.pad_id
    hint = "choose a dedicated pad token, or pass allow_pad_as_real_token=True if this is really meant"
    for other in ("eos_id", "bos_id"):
        if pad == getattr(tokenizer, other):
            raise ValueError(
                f"{tokenizer.source}: pad_id={pad} ({tokenizer.id_to_token(pad)!r}) equals {other}, so padding "
                f"could not be told apart from a real {other[:3].upper()}; {hint}"
            )
    if tokenizer.text_can_produce(pad):
        raise ValueError(
            f"{tokenizer.source}: pad_id={pad} ({tokenizer.id_to_token(pad)!r}) is a regular token that text "
            f"encodes to, so padding could not be told apart from real text; {hint}"
        )


def load_tokenizer(
    path: str | epath.PathLike,
    *,
    bos_id: SpecialTokenArg = None,
    eos_id: SpecialTokenArg = None,
    pad_id: SpecialTokenArg = None,
    allow_pad_as_real_token: bool = False,
    chat_template: str | None = None,
) -> Tokenizer:
    """Loads a tokenizer from a local or ``gs://`` path.

    Args:
      path: a sentencepiece ``.model`` file, a ``tokenizer.json``, or a Hugging Face tokenizer
        directory (``tokenizer.json`` is used when present, since it includes tokens added after
        training; otherwise ``tokenizer.model``).
      bos_id, eos_id, pad_id: an id, or a token string such as ``"<|eot_id|>"``. None takes the
        value from the directory's ``tokenizer_config.json``, then ``special_tokens_map.json``, then
        the sentencepiece model itself; still missing is an error. A bare ``tokenizer.json`` carries
        no such configuration, so its ids must be given here.
      allow_pad_as_real_token: accept a pad id equal to BOS/EOS or to a token text encodes to.
      chat_template: a Jinja chat template overriding the one shipped with the tokenizer (the
        directory's ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``).

    Raises:
      FileNotFoundError: the path, or the tokenizer file in the directory, does not exist.
      ValueError: an unreadable file, or a special id that is missing, unknown, or an unsafe pad.
    """
    root = epath.Path(path)
    source = str(root)
    kind, model_path, config_dir = _locate(root)
    backend_cls = backends.SentencePieceBackend if kind == "sentencepiece" else backends.HFTokenizersBackend
    backend = backend_cls(model_path.read_bytes(), str(model_path))
    configured = _read_hf_special_tokens(config_dir) if config_dir is not None else {}
    explicit = {"bos": bos_id, "eos": eos_id, "pad": pad_id}
    ids = {
        name: _resolve_special_id(name, explicit[name], configured.get(name), backend, source)
        for name in _SPECIAL_NAMES
    }
    for name, value in ids.items():
        if value is None:
            raise ValueError(
                f"{source}: no {name} token is configured ({_where_special_ids_come_from(kind, config_dir)}); "
                f"pass {name}_id= (an id or a token string){_PAD_ADVICE if name == 'pad' else ''}"
            )
    if chat_template is None and config_dir is not None:
        chat_template = _read_hf_chat_template(config_dir)
    return Tokenizer(
        backend,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids["pad"],
        allow_pad_as_real_token=allow_pad_as_real_token,
        chat_template=chat_template,
        source=source,
    )


_PAD_ADVICE = (
    ". Use a token text never encodes to (e.g. a reserved special token; <unk> in a byte-fallback model "
    "such as Llama 2's), or a real token together with allow_pad_as_real_token=True"
)


def vocabulary_at(path: str) -> tuple[str, str] | None:
    """``Tokenizer.vocabulary`` of the tokenizer file at ``path`` (or in the directory ``path``), read
    without building a tokenizer; None where there is none (a model directory saved without one)."""
    try:
        kind, model_file, _ = _locate(epath.Path(path))
    except (FileNotFoundError, ValueError):
        return None
    return kind, hashlib.sha256(model_file.read_bytes()).hexdigest()


def trained_with_other_vocabulary(tokenizer: Tokenizer, path: str) -> bool:
    """Whether the tokenizer saved at ``path`` is of ``tokenizer``'s kind but another vocabulary (False
    where there is none to compare, or the kinds differ and the files cannot be compared)."""
    stored = vocabulary_at(path)
    return stored is not None and stored[0] == tokenizer.vocabulary[0] and stored != tokenizer.vocabulary


def _locate(root: epath.Path) -> tuple[str, epath.Path, epath.Path | None]:
    """(backend kind, model file, directory holding the HF config files or None)."""
    if root.is_dir():
        for name, kind in ((TOKENIZER_JSON, "tokenizers"), (SENTENCEPIECE_MODEL, "sentencepiece")):
            if (root / name).exists():
                return kind, root / name, root
        raise FileNotFoundError(f"tokenizer directory {root} holds neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}")
    if not root.exists():
        raise FileNotFoundError(f"tokenizer path {root} does not exist")
    if root.name.endswith(".json"):
        return "tokenizers", root, None
    if root.name.endswith(".model"):
        return "sentencepiece", root, None
    raise ValueError(
        f"cannot tell what kind of tokenizer {root} is: expected a sentencepiece .model file, a tokenizer.json, "
        "or a directory holding one"
    )


def _where_special_ids_come_from(kind: str, config_dir: epath.Path | None) -> str:
    if config_dir is not None:
        sources = f"neither {TOKENIZER_CONFIG} nor {SPECIAL_TOKENS_MAP} sets it"
        return sources + (", and the sentencepiece model defines none" if kind == "sentencepiece" else "")
    if kind == "sentencepiece":
        return "the sentencepiece model defines none"
    return "a bare tokenizer.json carries no special-token configuration"


def _resolve_special_id(
    name: str,
    explicit: SpecialTokenArg,
    configured: tuple[str, str] | None,
    backend: backends.Backend,
    source: str,
) -> int | None:
    if isinstance(explicit, bool):
        raise ValueError(f"{name}_id must be a token id or a token string, got {explicit!r}")
    if isinstance(explicit, int):
        return explicit
    if isinstance(explicit, str):
        token_id = backend.token_to_id(explicit)
        if token_id is None:
            raise ValueError(f"{name}_id={explicit!r} is not a token of {source}")
        return token_id
    if explicit is not None:
        raise ValueError(f"{name}_id must be a token id or a token string, got {type(explicit).__name__}")
    if configured is not None:
        token, origin = configured
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{origin} sets {name}_token={token!r}, which is not in the vocabulary of {source}; pass {name}_id="
            )
        return token_id
    return backend.default_special_ids[name]


def _read_json(path: epath.Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _read_hf_special_tokens(config_dir: epath.Path) -> dict[str, tuple[str, str]]:
    """name -> (token string, file it came from); tokenizer_config.json wins over special_tokens_map.json."""
    found: dict[str, tuple[str, str]] = {}
    for filename in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        path = config_dir / filename
        if not path.exists():
            continue
        config = _read_json(path)
        for name in _SPECIAL_NAMES:
            key = f"{name}_token"
            if name in found or config.get(key) is None:
                continue
            value = config[key]
            if isinstance(value, dict):  # A serialised AddedToken: {"content": "<s>", "lstrip": false, ...}
                value = value.get("content")
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}: {key} must be a token string or an object with 'content', got {config[key]!r}"
                )
            found[name] = (value, str(path))
    return found


def _read_hf_chat_template(config_dir: epath.Path) -> str | None:
    """The chat template in the order transformers saves it: .jinja file, .json file, tokenizer_config."""
    jinja_path = config_dir / CHAT_TEMPLATE_JINJA
    if jinja_path.exists():
        return jinja_path.read_text()
    for filename in (CHAT_TEMPLATE_JSON, TOKENIZER_CONFIG):
        path = config_dir / filename
        if path.exists():
            template = _read_json(path).get("chat_template")
            if template is not None:
                return _default_template(template, path)
    return None


def _default_template(template: Any, path: epath.Path) -> str:
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # Several named templates: [{"name": "default", "template": "..."}, ...]
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
        raise ValueError(f"{path}: chat_template lists named templates but none is called 'default'")
    raise ValueError(f"{path}: chat_template must be a string, got {type(template).__name__}")
