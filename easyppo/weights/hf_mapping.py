"""How a Hugging Face LLaMA checkpoint's names, shapes and ``config.json`` map onto easyppo's parameter tree.

No arrays are read or written here (``easyppo.weights.huggingface`` does that): only which HF tensor
is which easyppo leaf (transposed or not, which row of a scanned layer stack), what kind of model a
``config.json`` describes, and the ``config.json`` an export writes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from flax import traverse_util

from easyppo.models import llama
from easyppo.models.llama import LlamaConfig
from easyppo.weights import hf_files

Path = tuple[str, ...]
PyTree = Any

KINDS = ("causal_lm", "reward", "value")
CAUSAL_LM_ARCHITECTURE = "LlamaForCausalLM"
SCORE_ARCHITECTURE = "LlamaForSequenceClassification"

# Parameter dtypes the converter reads and writes: float32 and bfloat16, plus float16, which some
# older checkpoints use and which round-trips just as exactly.
DTYPES = ("float32", "bfloat16", "float16")

Path = tuple[str, ...]
PyTree = Any

# One decoder block: (HF name below ``model.layers.{i}.``, easyppo path below the block, transposed?).
# torch's Linear stores weight as (out, in); Flax's Dense kernel is (in, out).
_BLOCK_TENSORS: tuple[tuple[str, Path, bool], ...] = (
    ("input_layernorm.weight", ("input_layernorm", "scale"), False),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), True),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), True),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
)
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"

# Buffers some older checkpoints saved that the config fully determines (RoPE frequencies).
DERIVED_TENSOR = re.compile(r"\.rotary_emb\.inv_freq$")


# ------------------------------------------------------------------------------------ name mapping


@dataclasses.dataclass(frozen=True)
class TensorLink:
    """One Hugging Face tensor and the easyppo parameter (or, for scanned layers, the row of it) it is."""

    hf_name: str
    path: Path
    layer: int | None  # row of a stacked [L, ...] leaf; None when the leaf is this tensor alone
    transpose: bool
    hf_shape: tuple[int, ...]


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {', '.join(map(repr, KINDS))}")


def abstract_params(config: LlamaConfig, kind: str) -> PyTree:
    """Shapes and dtypes of the parameter tree for ``config`` and ``kind`` (``llama.abstract_params``)."""
    check_kind(kind)
    return llama.abstract_params(config, kind)


def tensor_links(config: LlamaConfig, kind: str) -> list[TensorLink]:
    """Every Hugging Face tensor of the model, mapped to its place in easyppo's parameter tree.

    In file order: embedding, the layers in order, final norm, then the LM or score head.
    """
    flat = traverse_util.flatten_dict(abstract_params(config, kind))

    def link(hf_name: str, path: Path, transpose: bool, layer: int | None = None) -> TensorLink:
        shape = flat[path].shape[1:] if layer is not None else flat[path].shape
        hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        return TensorLink(hf_name, path, layer, transpose, hf_shape)

    links = [link(EMBEDDING, ("model", "embed_tokens", "embedding"), False)]
    for i in range(config.num_hidden_layers):
        for suffix, sub_path, transpose in _BLOCK_TENSORS:
            hf_name = f"model.layers.{i}.{suffix}"
            if config.scan_layers:
                links.append(link(hf_name, ("model", "layers", *sub_path), transpose, layer=i))
            else:
                links.append(link(hf_name, ("model", f"layers_{i}", *sub_path), transpose))
    links.append(link("model.norm.weight", ("model", "norm", "scale"), False))
    if kind == "causal_lm":
        if not config.tie_word_embeddings:
            links.append(link(LM_HEAD, ("lm_head", "kernel"), True))
    else:
        links.append(link("score.weight", ("score", "kernel"), True))
    return links


def links_by_leaf(links: Sequence[TensorLink]) -> dict[Path, list[TensorLink]]:
    by_leaf: dict[Path, list[TensorLink]] = {}
    for link in links:
        by_leaf.setdefault(link.path, []).append(link)
    return by_leaf


# ------------------------------------------------------------------------------- HF config checks


def config_path(model_dir: str) -> str:
    return str(epath.Path(model_dir) / hf_files.CONFIG_FILE)


def _num_labels(hf_config: dict[str, Any]) -> int:
    """How many outputs ``transformers`` would give the classifier: ``id2label`` decides, else 2."""
    if hf_config.get("id2label"):
        return len(hf_config["id2label"])
    return int(hf_config.get("num_labels", 2))


def architecture_kind(hf_config: dict[str, Any], model_dir: str) -> str | None:
    """``"causal_lm"`` or ``"reward"`` from ``architectures`` (None if unstated); rejects anything else."""
    architectures = hf_config.get("architectures") or []
    if not architectures:
        return None
    architecture = architectures[0]
    if architecture == CAUSAL_LM_ARCHITECTURE:
        return "causal_lm"
    if architecture == SCORE_ARCHITECTURE:
        return "reward"
    raise ValueError(
        f"{config_path(model_dir)}: architecture {architecture!r} is not supported; easyppo converts "
        f"{CAUSAL_LM_ARCHITECTURE} and {SCORE_ARCHITECTURE} (num_labels=1)"
    )


def check_architecture(hf_config: dict[str, Any], model_dir: str, kind: str) -> None:
    if hf_config.get("model_type", "llama") != "llama":
        raise ValueError(
            f"{config_path(model_dir)}: model_type {hf_config.get('model_type')!r} is not supported "
            "(easyppo converts LLaMA-family models, model_type 'llama')"
        )
    stated = architecture_kind(hf_config, model_dir)
    if stated == "causal_lm" and kind != "causal_lm":
        raise ValueError(
            f"{config_path(model_dir)} describes a {CAUSAL_LM_ARCHITECTURE}, which has no score head; "
            f"load it with kind='causal_lm' (kind={kind!r} needs a {SCORE_ARCHITECTURE})"
        )
    if stated == "reward" and kind == "causal_lm":
        raise ValueError(
            f"{config_path(model_dir)} describes a {SCORE_ARCHITECTURE}, which has no LM head; "
            "load it with kind='reward' or kind='value'"
        )
    if kind != "causal_lm" and _num_labels(hf_config) != 1:
        raise ValueError(
            f"{config_path(model_dir)} has num_labels={_num_labels(hf_config)}; easyppo reward and value "
            "models have a single output (num_labels=1)"
        )


def config_from_hf(hf_config: dict[str, Any], model_dir: str, **settings: Any) -> LlamaConfig:
    try:
        return LlamaConfig.from_hf_dict(hf_config, **settings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_path(model_dir)}: {e}") from e


def dtype_name(dtype: Any) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name} is not supported; use one of {', '.join(DTYPES)}")
    return name


def hf_config_dict(config: LlamaConfig, kind: str, *, dtype: str, pad_token_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` contents (as ``transformers.LlamaConfig`` keyword arguments) for ``kind``.

    Reward and value models become ``LlamaForSequenceClassification`` with ``num_labels=1``; their
    ``pad_token_id`` must be set, because that is how ``transformers`` finds each row's last token.
    """
    check_kind(kind)
    d = config.to_hf_dict()
    d.pop("torch_dtype", None)
    d["dtype"] = dtype_name(dtype)
    if pad_token_id is not None:
        d["pad_token_id"] = int(pad_token_id)
    if kind == "causal_lm":
        d["architectures"] = [CAUSAL_LM_ARCHITECTURE]
        return d
    if d.get("pad_token_id") is None:
        raise ValueError(
            f"exporting a {kind} model as {SCORE_ARCHITECTURE} needs a pad token id (transformers finds "
            "each sequence's last token by it): set config.pad_token_id or pass pad_token_id"
        )
    d["architectures"] = [SCORE_ARCHITECTURE]
    d["num_labels"] = 1
    return d
