"""Hugging Face LLaMA checkpoints <-> easyppo parameter trees, in memory.

Because easyppo's LLaMA reproduces ``transformers``' numerics, conversion is a renaming of tensors:
``model.layers.3.self_attn.q_proj.weight`` [out, in] becomes ``model/layers_3/self_attn/q_proj/kernel``
[in, out] (or row 3 of ``model/layers/self_attn/q_proj/kernel`` when the layers are scanned). No
Llama code is re-implemented for export: tensors are written with ``safetensors`` and the config
with ``transformers``' own config class, so whatever ``transformers`` loads is what it wrote.

A Hugging Face directory holds ``config.json``, safetensors or ``.bin`` weights (one file, or shards
with an index) and tokenizer files; ``LlamaForCausalLM`` for policies, ``LlamaForSequenceClassification``
with ``num_labels=1`` for reward and value models. ``load_hf`` / ``save_hf`` read and write one.

Loading places every tensor directly on its devices with ``jax.make_array_from_callback``, reading
only the slice each device holds, so a model that only fits when sharded is never whole on one host
device. easyppo's own checkpoint format is ``easyppo.weights.model_checkpoint``; the logit check
against ``transformers`` is ``easyppo.weights.verify``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from flax import traverse_util

from easyppo.core import sharding as sharding_lib
from easyppo.models import partitioning
from easyppo.models.llama import LlamaConfig, init_params, make_model
from easyppo.weights import hf_files

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
_EMBEDDING = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"

# Buffers some older checkpoints saved that the config fully determines (RoPE frequencies).
_DERIVED_TENSOR = re.compile(r"\.rotary_emb\.inv_freq$")


# ------------------------------------------------------------------------------------ name mapping


@dataclasses.dataclass(frozen=True)
class TensorLink:
    """One Hugging Face tensor and the easyppo parameter (or, for scanned layers, the row of it) it is."""

    hf_name: str
    path: Path
    layer: int | None  # row of a stacked [L, ...] leaf; None when the leaf is this tensor alone
    transpose: bool
    hf_shape: tuple[int, ...]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {', '.join(map(repr, KINDS))}")


def abstract_params(config: LlamaConfig, kind: str) -> PyTree:
    """Shapes and dtypes of the parameter tree for ``config`` and ``kind``, without allocating it."""
    _check_kind(kind)
    return jax.tree.map(lambda leaf: leaf, _traced_params(config, kind))  # a fresh tree: callers may edit it


@functools.lru_cache(maxsize=16)
def _traced_params(config: LlamaConfig, kind: str) -> PyTree:
    # Tracing the model takes a noticeable fraction of a second; a conversion asks several times.
    return jax.eval_shape(functools.partial(init_params, config, kind), jax.random.key(0))


def tensor_links(config: LlamaConfig, kind: str) -> list[TensorLink]:
    """Every Hugging Face tensor of the model, mapped to its place in easyppo's parameter tree.

    In file order: embedding, the layers in order, final norm, then the LM or score head.
    """
    flat = traverse_util.flatten_dict(abstract_params(config, kind))

    def link(hf_name: str, path: Path, transpose: bool, layer: int | None = None) -> TensorLink:
        shape = flat[path].shape[1:] if layer is not None else flat[path].shape
        hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        return TensorLink(hf_name, path, layer, transpose, hf_shape)

    links = [link(_EMBEDDING, ("model", "embed_tokens", "embedding"), False)]
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
            links.append(link(_LM_HEAD, ("lm_head", "kernel"), True))
    else:
        links.append(link("score.weight", ("score", "kernel"), True))
    return links


def _links_by_leaf(links: Sequence[TensorLink]) -> dict[Path, list[TensorLink]]:
    by_leaf: dict[Path, list[TensorLink]] = {}
    for link in links:
        by_leaf.setdefault(link.path, []).append(link)
    return by_leaf


# ------------------------------------------------------------------------------- HF config checks


def _config_path(model_dir: str) -> str:
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
        f"{_config_path(model_dir)}: architecture {architecture!r} is not supported; easyppo converts "
        f"{CAUSAL_LM_ARCHITECTURE} and {SCORE_ARCHITECTURE} (num_labels=1)"
    )


def _check_architecture(hf_config: dict[str, Any], model_dir: str, kind: str) -> None:
    if hf_config.get("model_type", "llama") != "llama":
        raise ValueError(
            f"{_config_path(model_dir)}: model_type {hf_config.get('model_type')!r} is not supported "
            "(easyppo converts LLaMA-family models, model_type 'llama')"
        )
    stated = architecture_kind(hf_config, model_dir)
    if stated == "causal_lm" and kind != "causal_lm":
        raise ValueError(
            f"{_config_path(model_dir)} describes a {CAUSAL_LM_ARCHITECTURE}, which has no score head; "
            f"load it with kind='causal_lm' (kind={kind!r} needs a {SCORE_ARCHITECTURE})"
        )
    if stated == "reward" and kind == "causal_lm":
        raise ValueError(
            f"{_config_path(model_dir)} describes a {SCORE_ARCHITECTURE}, which has no LM head; "
            "load it with kind='reward' or kind='value'"
        )
    if kind != "causal_lm" and _num_labels(hf_config) != 1:
        raise ValueError(
            f"{_config_path(model_dir)} has num_labels={_num_labels(hf_config)}; easyppo reward and value "
            "models have a single output (num_labels=1)"
        )


def _config_from_hf(hf_config: dict[str, Any], model_dir: str, **settings: Any) -> LlamaConfig:
    try:
        return LlamaConfig.from_hf_dict(hf_config, **settings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{_config_path(model_dir)}: {e}") from e


# ---------------------------------------------------------------------------------------- loading


def _resolve_shardings(
    abstract: PyTree,
    shardings: PyTree | None,
    mesh: jax.sharding.Mesh | None,
    rules: sharding_lib.PartitionRules | None,
) -> PyTree:
    """Per-leaf shardings: as given, from ``mesh`` and partition ``rules``, or the first local device."""
    if shardings is not None and mesh is not None:
        raise ValueError("pass either shardings or mesh (with optional rules), not both")
    if shardings is not None:
        return shardings
    if mesh is not None:
        rules = partitioning.LLAMA_RULES if rules is None else rules
        return sharding_lib.named_shardings(abstract, mesh, rules)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, abstract)


def _check_hf_tensors(checkpoint: hf_files.HFCheckpoint, links: Sequence[TensorLink], config: LlamaConfig) -> None:
    """Every expected tensor present with the shape ``config.json`` implies, and nothing unaccounted for."""
    for link in links:
        if link.hf_name not in checkpoint:
            raise ValueError(
                f"tensor {link.hf_name!r} is missing from {checkpoint.describe_location()} "
                f"(config.json describes {config.num_hidden_layers} layers"
                f"{', tied embeddings' if config.tie_word_embeddings else ''})"
            )
        info = checkpoint.info(link.hf_name)
        if info.shape != link.hf_shape:
            raise ValueError(
                f"tensor {link.hf_name!r} in {checkpoint.describe_location(link.hf_name)} has shape "
                f"{list(info.shape)}, but config.json implies {list(link.hf_shape)}"
            )
    expected = {link.hf_name for link in links}
    redundant = {_LM_HEAD} if config.tie_word_embeddings else set()  # a tied head is the embedding
    unexpected = [
        name
        for name in checkpoint.names
        if name not in expected and name not in redundant and not _DERIVED_TENSOR.search(name)
    ]
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ValueError(
            f"{checkpoint.describe_location(unexpected[0])} holds tensors easyppo's LLaMA has no place for: "
            f"{shown}{more}; does config.json describe these weights?"
        )


def _slice_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _leaf_reader(
    checkpoint: hf_files.HFCheckpoint, links: Sequence[TensorLink], dtype: np.dtype
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """``index -> leaf[index]`` for ``jax.make_array_from_callback``, reading only that slice from disk.

    Replicated leaves ask for the same slice once per device; the memo reads it from disk once.
    """
    stacked = links[0].layer is not None
    memo: dict[tuple, np.ndarray] = {}

    def read_link(link: TensorLink, index: tuple[slice, ...]) -> np.ndarray:
        if link.transpose:
            return checkpoint.read(link.hf_name, index[::-1]).T
        return checkpoint.read(link.hf_name, index)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = _slice_key(index)
        if key not in memo:
            if stacked:
                rows = range(len(links))[index[0]]
                data = np.stack([read_link(links[i], index[1:]) for i in rows])
            else:
                data = read_link(links[0], index)
            memo[key] = np.ascontiguousarray(data.astype(dtype, copy=False))
        return memo[key]

    return read


def _read_params(
    checkpoint: hf_files.HFCheckpoint, config: LlamaConfig, kind: str, shardings: PyTree
) -> dict[str, Any]:
    links = tensor_links(config, kind)
    _check_hf_tensors(checkpoint, links, config)
    abstract = traverse_util.flatten_dict(abstract_params(config, kind))
    flat_shardings = traverse_util.flatten_dict(shardings)
    by_leaf = _links_by_leaf(links)
    params = {}
    for path, leaf in abstract.items():
        if path not in flat_shardings:
            raise ValueError(f"shardings has no entry for parameter {'/'.join(path)}")
        reader = _leaf_reader(checkpoint, by_leaf[path], np.dtype(leaf.dtype))
        params[path] = jax.make_array_from_callback(leaf.shape, flat_shardings[path], reader)
    return traverse_util.unflatten_dict(params)


def _dtype_name(dtype: Any) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name} is not supported; use one of {', '.join(DTYPES)}")
    return name


def load_hf(
    path: str,
    kind: str = "causal_lm",
    *,
    param_dtype: str | None = None,
    dtype: str = "float32",
    scan_layers: bool = False,
    remat: str = "none",
    shardings: PyTree | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding_lib.PartitionRules | None = None,
) -> tuple[LlamaConfig, nn.Module, dict[str, Any]]:
    """Loads a Hugging Face LLaMA directory as ``(config, module, params)``.

    ``module.apply({"params": params}, input_ids, attention_mask=mask)`` returns logits [B, T, V]
    (``kind="causal_lm"``, from a ``LlamaForCausalLM``), scores [B] (``"reward"``) or values [B, T]
    (``"value"``; both from a ``LlamaForSequenceClassification`` with ``num_labels=1``).

    ``param_dtype`` defaults to the dtype the weights are stored in, so nothing is rounded or widened
    unless asked; ``dtype`` is the compute dtype. Parameters land on ``shardings`` (a tree of
    ``jax.sharding.Sharding`` matching the parameter tree), or on ``mesh`` split by ``rules``
    (default ``easyppo.models.partitioning.LLAMA_RULES``), or else on the first local device; each device reads
    only its own slice of each tensor from disk.
    """
    _check_kind(kind)
    hf_config = hf_files.read_config(path)
    _check_architecture(hf_config, path, kind)
    with hf_files.HFCheckpoint(path) as checkpoint:
        if param_dtype is None:
            if _EMBEDDING not in checkpoint:
                raise ValueError(f"tensor {_EMBEDDING!r} is missing from {checkpoint.describe_location()}")
            param_dtype = _dtype_name(checkpoint.info(_EMBEDDING).dtype)
        config = _config_from_hf(
            hf_config,
            path,
            param_dtype=_dtype_name(param_dtype),
            dtype=dtype,
            scan_layers=scan_layers,
            remat=remat,
        )
        shardings = _resolve_shardings(abstract_params(config, kind), shardings, mesh, rules)
        params = _read_params(checkpoint, config, kind, shardings)
    return config, make_model(config, kind), params


# ---------------------------------------------------------------------------------------- saving


def hf_config_dict(config: LlamaConfig, kind: str, *, dtype: str, pad_token_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` contents (as ``transformers.LlamaConfig`` keyword arguments) for ``kind``.

    Reward and value models become ``LlamaForSequenceClassification`` with ``num_labels=1``; their
    ``pad_token_id`` must be set, because that is how ``transformers`` finds each row's last token.
    """
    _check_kind(kind)
    d = config.to_hf_dict()
    d.pop("torch_dtype", None)
    d["dtype"] = _dtype_name(dtype)
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


def _to_host(x: Any) -> np.ndarray:
    """A parameter (or one row of it) as a host NumPy array, gathering it across processes if need be."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_tensor(leaf: Any, link: TensorLink, dtype: np.dtype) -> np.ndarray:
    x = _to_host(leaf if link.layer is None else leaf[link.layer])
    return (x.T if link.transpose else x).astype(dtype, copy=False)


def _check_param_tree(params: PyTree, config: LlamaConfig, kind: str) -> dict[Path, Any]:
    """The flattened ``params``, after checking they have exactly the paths and shapes of ``kind``."""
    flat = traverse_util.flatten_dict(nn.unbox(params))
    expected = traverse_util.flatten_dict(abstract_params(config, kind))
    missing = [p for p in expected if p not in flat]
    extra = [p for p in flat if p not in expected]
    if missing or extra:
        problems = [f"missing {'/'.join(p)}" for p in missing[:3]]
        problems += [f"unexpected {'/'.join(p)}" for p in extra[:3]]
        raise ValueError(
            f"params do not match a {kind} model with this config (scan_layers={config.scan_layers}, "
            f"tie_word_embeddings={config.tie_word_embeddings}): {'; '.join(problems)}"
        )
    for path, leaf in expected.items():
        if tuple(flat[path].shape) != tuple(leaf.shape):
            raise ValueError(
                f"parameter {'/'.join(path)} has shape {list(flat[path].shape)}, config implies {list(leaf.shape)}"
            )
    return flat


def save_hf(
    path: str,
    config: LlamaConfig,
    params: PyTree,
    kind: str = "causal_lm",
    *,
    dtype: str | None = None,
    pad_token_id: int | None = None,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = hf_files.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Writes ``params`` as a Hugging Face directory ``transformers`` loads; returns the weight files.

    ``kind="causal_lm"`` gives a ``LlamaForCausalLM``; ``"reward"`` and ``"value"`` a
    ``LlamaForSequenceClassification`` with one label. Tensors are written in ``dtype`` (default: the
    parameters' own dtype), as shards of at most ``max_shard_bytes`` with an index when they do not
    fit one file; one tensor at a time is gathered to the host, so sharded parameters are never whole
    on one device. Tokenizer files are copied from ``tokenizer_dir`` when given. In a multi-host job
    call it on every process (each takes part in gathering); process 0 writes.
    """
    _check_kind(kind)
    if hf_files.existing_weight_files(path):
        raise FileExistsError(
            f"{path} already holds weights ({', '.join(hf_files.existing_weight_files(path))}); "
            "export into an empty directory"
        )
    flat = _check_param_tree(params, config, kind)
    if dtype is None:
        dtype = flat[("model", "embed_tokens", "embedding")].dtype
    out_dtype = np.dtype(_dtype_name(dtype))
    hf_config = hf_config_dict(config, kind, dtype=out_dtype.name, pad_token_id=pad_token_id)
    planned = [
        hf_files.PlannedTensor(
            link.hf_name,
            link.hf_shape,
            out_dtype,
            functools.partial(_hf_tensor, flat[link.path], link, out_dtype),
        )
        for link in tensor_links(config, kind)
    ]
    is_writer = jax.process_index() == 0
    files = hf_files.write_safetensors(path, planned, max_shard_bytes=max_shard_bytes, write=is_writer)
    if is_writer:
        hf_files.write_config(path, hf_config)
        if tokenizer_dir is not None:
            hf_files.copy_companion_files(tokenizer_dir, path)
    return files
