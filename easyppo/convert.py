"""Hugging Face <-> easyppo checkpoints, and a logit check against ``transformers``.

Because easyppo's LLaMA reproduces ``transformers``' numerics, conversion is a renaming of tensors:
``model.layers.3.self_attn.q_proj.weight`` [out, in] becomes ``model/layers_3/self_attn/q_proj/kernel``
[in, out] (or row 3 of ``model/layers/self_attn/q_proj/kernel`` when the layers are scanned). No
Llama code is re-implemented for export: tensors are written with ``safetensors`` and the config
with ``transformers``' own config class, so whatever ``transformers`` loads is what it wrote.

Three formats meet here:

* a **Hugging Face directory**: ``config.json``, safetensors or ``.bin`` weights (one file, or shards
  with an index), tokenizer files; ``LlamaForCausalLM`` for policies, ``LlamaForSequenceClassification``
  with ``num_labels=1`` for reward and value models;
* an **easyppo model checkpoint**: an Orbax checkpoint of the parameter tree (``params/``) beside
  ``easyppo_model.json`` (architecture, parameter layout and model kind) and the tokenizer files,
  which training runs restore, sharded onto their mesh, with ``load_checkpoint``;
* **in-memory parameters**: ``load_hf`` / ``save_hf`` for users and tests.

Loading places every tensor directly on its devices with ``jax.make_array_from_callback``, reading
only the slice each device holds, so a model that only fits when sharded is never whole on one host
device. Command line: ``python -m easyppo.convert {to-easyppo,to-hf,verify} --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from easyppo import distributed, hf_io
from easyppo import sharding as sharding_lib
from easyppo.models.llama import LlamaConfig, init_params, make_model

KINDS = ("causal_lm", "reward", "value")
CAUSAL_LM_ARCHITECTURE = "LlamaForCausalLM"
SCORE_ARCHITECTURE = "LlamaForSequenceClassification"
MODEL_METADATA_FILE = "easyppo_model.json"
PARAMS_DIR = "params"
_FORMAT_NAME = "easyppo-model"
_FORMAT_VERSION = 1

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
    return str(epath.Path(model_dir) / hf_io.CONFIG_FILE)


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
        rules = sharding_lib.LLAMA_RULES if rules is None else rules
        return sharding_lib.named_shardings(abstract, mesh, rules)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, abstract)


def _check_hf_tensors(
    checkpoint: hf_io.HFCheckpoint, links: Sequence[TensorLink], config: LlamaConfig
) -> None:
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
    checkpoint: hf_io.HFCheckpoint, links: Sequence[TensorLink], dtype: np.dtype
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
    checkpoint: hf_io.HFCheckpoint, config: LlamaConfig, kind: str, shardings: PyTree
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
    (default ``easyppo.sharding.LLAMA_RULES``), or else on the first local device; each device reads
    only its own slice of each tensor from disk.
    """
    _check_kind(kind)
    hf_config = hf_io.read_config(path)
    _check_architecture(hf_config, path, kind)
    with hf_io.HFCheckpoint(path) as checkpoint:
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


def hf_config_dict(
    config: LlamaConfig, kind: str, *, dtype: str, pad_token_id: int | None = None
) -> dict[str, Any]:
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
                f"parameter {'/'.join(path)} has shape {list(flat[path].shape)}, "
                f"config implies {list(leaf.shape)}"
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
    max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES,
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
    if hf_io.existing_weight_files(path):
        raise FileExistsError(
            f"{path} already holds weights ({', '.join(hf_io.existing_weight_files(path))}); "
            "export into an empty directory"
        )
    flat = _check_param_tree(params, config, kind)
    if dtype is None:
        dtype = flat[("model", "embed_tokens", "embedding")].dtype
    out_dtype = np.dtype(_dtype_name(dtype))
    hf_config = hf_config_dict(config, kind, dtype=out_dtype.name, pad_token_id=pad_token_id)
    planned = [
        hf_io.PlannedTensor(
            link.hf_name,
            link.hf_shape,
            out_dtype,
            functools.partial(_hf_tensor, flat[link.path], link, out_dtype),
        )
        for link in tensor_links(config, kind)
    ]
    is_writer = jax.process_index() == 0
    files = hf_io.write_safetensors(path, planned, max_shard_bytes=max_shard_bytes, write=is_writer)
    if is_writer:
        hf_io.write_config(path, hf_config)
        if tokenizer_dir is not None:
            hf_io.copy_companion_files(tokenizer_dir, path)
    return files


# ------------------------------------------------------------------------- easyppo model checkpoint

# Config fields that describe the stored tree (its dtype and whether layers are stacked) rather than
# how a run computes; ``dtype`` and ``remat`` are left to the run that restores the checkpoint.
_COMPUTE_ONLY_FIELDS = ("dtype", "remat")


def save_checkpoint(directory: str, config: LlamaConfig, params: PyTree, kind: str) -> None:
    """Saves ``params`` as an easyppo model checkpoint: Orbax ``params/`` plus ``easyppo_model.json``.

    The JSON (written last, so its presence means the checkpoint is complete) records the
    architecture, the parameter layout (``param_dtype``, ``scan_layers``) and the model kind, which is
    everything ``load_checkpoint`` needs to rebuild the tree and restore it onto any mesh.
    """
    _check_kind(kind)
    directory = epath.Path(directory)
    if (directory / MODEL_METADATA_FILE).exists() or (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory} already holds an easyppo model checkpoint")
    flat = _check_param_tree(params, config, kind)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, traverse_util.unflatten_dict(flat))
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        fields = dataclasses.asdict(config)
        for name in _COMPUTE_ONLY_FIELDS:
            fields.pop(name)
        metadata = {"format": _FORMAT_NAME, "version": _FORMAT_VERSION, "kind": kind, "config": fields}
        (directory / MODEL_METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def read_checkpoint_metadata(directory: str) -> tuple[LlamaConfig, str]:
    """The ``(config, kind)`` an easyppo model checkpoint was saved with (nothing is restored)."""
    path = epath.Path(directory) / MODEL_METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not an easyppo model checkpoint")
    metadata = json.loads(path.read_text())
    if metadata.get("format") != _FORMAT_NAME or metadata.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {metadata.get('format')!r} version {metadata.get('version')!r} is not "
            f"{_FORMAT_NAME!r} version {_FORMAT_VERSION}"
        )
    try:
        config = LlamaConfig(**metadata["config"])
    except TypeError as e:
        raise ValueError(f"{path}: config does not match easyppo's LlamaConfig: {e}") from e
    return config, metadata["kind"]


def load_checkpoint(
    directory: str,
    *,
    shardings: PyTree | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding_lib.PartitionRules | None = None,
    param_dtype: str | None = None,
) -> tuple[LlamaConfig, str, dict[str, Any]]:
    """Restores an easyppo model checkpoint as ``(config, kind, params)``.

    Parameters are restored straight onto ``shardings`` (or ``mesh`` split by ``rules``, or the first
    local device), whatever mesh they were saved from; ``param_dtype`` casts them on the way in
    (e.g. a bfloat16 conversion restored as float32 master weights).
    """
    config, kind = read_checkpoint_metadata(directory)
    if param_dtype is not None:
        config = config.replace(param_dtype=_dtype_name(param_dtype))
    abstract = abstract_params(config, kind)
    shardings = _resolve_shardings(abstract, shardings, mesh, rules)
    target = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        shardings,
    )
    params = ocp.StandardCheckpointer().restore(epath.Path(directory) / PARAMS_DIR, target)
    return config, kind, params


# ------------------------------------------------------------------------------ whole conversions


def convert_hf_to_easyppo(
    hf_dir: str,
    out_dir: str,
    *,
    kind: str | None = None,
    param_dtype: str | None = None,
    scan_layers: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[LlamaConfig, str]:
    """HF directory -> easyppo model checkpoint (with the tokenizer files); returns ``(config, kind)``.

    ``kind`` defaults to what ``config.json`` names: ``causal_lm`` for ``LlamaForCausalLM``,
    ``reward`` for ``LlamaForSequenceClassification``.
    """
    if kind is None:
        kind = architecture_kind(hf_io.read_config(hf_dir), hf_dir) or "causal_lm"
    config, _, params = load_hf(hf_dir, kind, param_dtype=param_dtype, scan_layers=scan_layers, mesh=mesh)
    save_checkpoint(out_dir, config, params, kind)
    if jax.process_index() == 0:
        hf_io.copy_companion_files(hf_dir, out_dir)
    return config, kind


def convert_easyppo_to_hf(
    checkpoint_dir: str,
    out_dir: str,
    *,
    dtype: str | None = None,
    pad_token_id: int | None = None,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[LlamaConfig, str, list[str]]:
    """easyppo model checkpoint -> HF directory; tokenizer files come from ``tokenizer_dir`` or the
    checkpoint. Returns ``(config, kind, weight files)``. With ``mesh`` the parameters are restored
    split over it (by ``LLAMA_RULES``) instead of onto one device."""
    config, kind, params = load_checkpoint(checkpoint_dir, mesh=mesh)
    files = save_hf(
        out_dir,
        config,
        params,
        kind,
        dtype=dtype,
        pad_token_id=pad_token_id,
        tokenizer_dir=tokenizer_dir if tokenizer_dir is not None else checkpoint_dir,
        max_shard_bytes=max_shard_bytes,
    )
    return config, kind, files


# ---------------------------------------------------------------------------------------- verify


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """How far easyppo's outputs are from ``transformers``' on the same random tokens."""

    kind: str
    dtype: str
    output_name: str  # "logits", "scores" or "values"
    max_abs_diff: float
    max_abs_reference: float  # the largest |output| of transformers, for scale
    num_sequences: int
    min_length: int
    max_length: int

    def summary(self) -> str:
        return (
            f"verify {self.kind} ({self.dtype}): {self.num_sequences} sequences of "
            f"{self.min_length}-{self.max_length} random tokens, left- and right-padded\n"
            f"max abs difference of {self.output_name} (easyppo vs transformers): {self.max_abs_diff:.3e}"
            f"  (largest |{self.output_name}| {self.max_abs_reference:.3g})"
        )


def random_padded_batch(
    vocab_size: int, batch_size: int, seq_len: int, *, pad_token_id: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens (never the pad id) of random lengths in [seq_len/2, seq_len]: the first row full,
    odd rows left-padded, even rows right-padded. Returns ``(input_ids, attention_mask)``, int32."""
    rng = np.random.default_rng(seed)
    pad = 0 if pad_token_id is None else pad_token_id
    ids = np.full((batch_size, seq_len), pad, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        length = seq_len if row == 0 else int(rng.integers(max(1, seq_len // 2), seq_len + 1))
        if pad_token_id is None:
            tokens = rng.integers(0, vocab_size, length)
        else:
            tokens = rng.integers(0, vocab_size - 1, length)
            tokens = np.where(tokens >= pad_token_id, tokens + 1, tokens)  # every id but the pad id
        span = slice(seq_len - length, seq_len) if row % 2 else slice(0, length)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask


def _transformers_outputs(
    hf_dir: str, kind: str, dtype: str, ids: np.ndarray, mask: np.ndarray
) -> list[np.ndarray]:
    """Per row, transformers' output on that row's tokens alone (no padding), in float32 NumPy."""
    import torch
    import transformers

    if kind == "causal_lm":
        model_class = transformers.LlamaForCausalLM
    else:
        model_class = transformers.LlamaForSequenceClassification
    model = model_class.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    outputs = []
    with torch.no_grad():
        for row_ids, row_mask in zip(ids, mask):
            tokens = torch.from_numpy(row_ids[row_mask.astype(bool)].astype(np.int64))[None]
            if kind == "causal_lm":
                out = model(input_ids=tokens).logits[0]
            elif kind == "reward":
                out = model(input_ids=tokens).logits[0, 0]
            else:
                out = model.score(model.model(input_ids=tokens).last_hidden_state)[0, :, 0]
            outputs.append(out.float().numpy())
    return outputs


def verify(
    hf_dir: str,
    *,
    checkpoint_dir: str | None = None,
    kind: str | None = None,
    dtype: str = "float32",
    batch_size: int = 4,
    seq_len: int = 16,
    seed: int = 0,
) -> VerifyResult:
    """Compares easyppo's outputs with ``transformers``' for the model in ``hf_dir``.

    The easyppo side is ``checkpoint_dir`` (an easyppo model checkpoint) when given, else ``hf_dir``
    loaded with ``load_hf``. Both run in ``dtype`` (float32 by default, so the number measures the
    conversion rather than rounding). easyppo sees one left/right-padded batch; ``transformers`` sees
    each row's real tokens alone, so padding and position handling are checked too.
    """
    if checkpoint_dir is not None:
        config, stored_kind, params = load_checkpoint(checkpoint_dir, param_dtype=dtype)
        kind = kind or stored_kind
        if (kind == "causal_lm") != (stored_kind == "causal_lm"):
            raise ValueError(
                f"{checkpoint_dir} holds a {stored_kind} model, which cannot be verified as {kind}"
            )
        config = config.replace(dtype=dtype)
        module = make_model(config, kind)
    else:
        kind = kind or architecture_kind(hf_io.read_config(hf_dir), hf_dir) or "causal_lm"
        config, module, params = load_hf(hf_dir, kind, param_dtype=dtype, dtype=dtype)
    ids, mask = random_padded_batch(
        config.vocab_size, batch_size, seq_len, pad_token_id=config.pad_token_id, seed=seed
    )
    ours = np.asarray(module.apply({"params": params}, ids, attention_mask=mask), np.float32)
    theirs = _transformers_outputs(hf_dir, kind, dtype, ids, mask)
    diffs, scale = [], []
    for row, reference in enumerate(theirs):
        mine = ours[row] if kind == "reward" else ours[row][mask[row].astype(bool)]
        diffs.append(np.max(np.abs(mine - reference)))
        scale.append(np.max(np.abs(reference)))
    lengths = mask.sum(axis=1)
    return VerifyResult(
        kind=kind,
        dtype=dtype,
        output_name={"causal_lm": "logits", "reward": "scores", "value": "values"}[kind],
        max_abs_diff=float(max(diffs)),
        max_abs_reference=float(max(scale)),
        num_sequences=batch_size,
        min_length=int(lengths.min()),
        max_length=int(lengths.max()),
    )


# ------------------------------------------------------------------------------------------- CLI

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' (10^9), '2GiB' (2^30), '500MB', or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 2GiB, 500MB or 1000000")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


# Default pass mark of ``verify``, relative to the largest |output| of transformers. float32 leaves only
# summation-order noise (~1e-6 relative on the test models); bfloat16 rounds the weights alone by
# ~0.4%, which after a few layers moves logits by a few percent on both sides.
DEFAULT_RELATIVE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def parse_mesh(text: str) -> ml_collections.ConfigDict:
    """``"1,-1,1"`` -> a mesh config (data, fsdp, tensor); one size may be -1 (all remaining devices)."""
    parts = text.split(",")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) != len(sharding_lib.MESH_AXES):
        raise argparse.ArgumentTypeError(f"expected {','.join(sharding_lib.MESH_AXES).upper()} sizes such as 1,-1,1, got {text!r}")
    return ml_collections.ConfigDict(dict(zip(sharding_lib.MESH_AXES, sizes)))


def _print_verify(result: VerifyResult, tolerance: float | None) -> int:
    """Prints the summary and a pass/fail line; returns the exit code (1 when above the tolerance)."""
    if tolerance is None:
        relative = DEFAULT_RELATIVE_TOLERANCE[result.dtype]
        tolerance = relative * result.max_abs_reference
        rule = f"{tolerance:.3e} = {relative:g} x largest |{result.output_name}|"
    else:
        rule = f"{tolerance:g}"
    print(result.summary())
    ok = result.max_abs_diff <= tolerance
    print(f"{'OK' if ok else 'FAILED'}: {'within' if ok else 'above'} tolerance {rule}")
    return 0 if ok else 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easyppo-convert",
        description="Convert LLaMA checkpoints between Hugging Face and easyppo, "
        "and check them against transformers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    to_easyppo = commands.add_parser("to-easyppo", help="HF directory -> easyppo model checkpoint")
    to_easyppo.add_argument("hf_dir", help="Hugging Face model directory (config.json + weights)")
    to_easyppo.add_argument("out_dir", help="new easyppo model checkpoint directory")
    to_easyppo.add_argument("--kind", choices=KINDS, help="default: causal_lm or reward, from config.json")
    to_easyppo.add_argument(
        "--param-dtype", choices=DTYPES, help="default: the dtype the weights are stored in"
    )
    to_easyppo.add_argument(
        "--scan-layers", action="store_true", help="store the layers stacked, for scan_layers=True"
    )
    to_easyppo.add_argument("--verify", action="store_true", help="afterwards, compare with transformers")

    to_hf = commands.add_parser("to-hf", help="easyppo model checkpoint -> HF directory")
    for command in (to_easyppo, to_hf):
        command.add_argument(
            "--mesh", type=parse_mesh, metavar="DATA,FSDP,TENSOR",
            help="split the parameters over this mesh of every device (e.g. 1,-1,1: FSDP over all), so a "
            "model larger than one device's memory converts; default: the first local device",
        )
    to_hf.add_argument("checkpoint_dir", help="easyppo model checkpoint directory")
    to_hf.add_argument("out_dir", help="new Hugging Face model directory")
    to_hf.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's parameter dtype")
    to_hf.add_argument(
        "--pad-token-id", type=int, help="reward/value models: overrides the config's pad token id"
    )
    to_hf.add_argument("--tokenizer-dir", help="copy tokenizer files from here (default: the checkpoint)")
    to_hf.add_argument(
        "--max-shard-size", type=parse_size, default=hf_io.DEFAULT_MAX_SHARD_BYTES,
        help="split the weights into files of at most this size (default 5GiB)",
    )
    to_hf.add_argument("--verify", action="store_true", help="afterwards, compare with transformers")

    check = commands.add_parser("verify", help="compare easyppo's logits/scores with transformers'")
    check.add_argument("hf_dir", help="Hugging Face model directory (the reference)")
    check.add_argument(
        "--checkpoint", help="easyppo model checkpoint to check (default: hf_dir converted in memory)"
    )
    check.add_argument("--kind", choices=KINDS, help="default: from the checkpoint or config.json")
    for command in (check, to_easyppo, to_hf):
        group = command if command is check else command.add_argument_group("verification (with --verify)")
        dtype_flag = "--dtype" if command is check else "--verify-dtype"
        group.add_argument(dtype_flag, dest="verify_dtype", choices=DTYPES, default="float32",
                           help="compute dtype of both models during the check (default float32)")
        group.add_argument("--batch-size", type=int, default=4, help="random sequences (default 4)")
        group.add_argument("--seq-len", type=int, default=16, help="longest sequence (default 16)")
        group.add_argument("--seed", type=int, default=0, help="seed of the random tokens and lengths")
        group.add_argument(
            "--tolerance", type=float,
            help="max abs difference allowed "
            "(default: 1e-4 x the largest |output| in float32, 5e-2 in bfloat16)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``easyppo-convert`` / ``python -m easyppo.convert``; returns the exit code."""
    args = _build_parser().parse_args(argv)
    verify_options = dict(
        dtype=args.verify_dtype, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed
    )
    try:
        distributed.initialize()  # every host of a pod runs the same command (EASYPPO_DISTRIBUTED)
        mesh = sharding_lib.make_mesh(args.mesh) if getattr(args, "mesh", None) is not None else None
        if args.command == "to-easyppo":
            config, kind = convert_hf_to_easyppo(
                args.hf_dir,
                args.out_dir,
                kind=args.kind,
                param_dtype=args.param_dtype,
                scan_layers=args.scan_layers,
                mesh=mesh,
            )
            print(
                f"wrote {kind} checkpoint {args.out_dir}: {config.num_params():,} parameters, "
                f"{config.param_dtype}, scan_layers={config.scan_layers}"
            )
            if args.verify:
                result = verify(args.hf_dir, checkpoint_dir=args.out_dir, **verify_options)
                return _print_verify(result, args.tolerance)
        elif args.command == "to-hf":
            config, kind, files = convert_easyppo_to_hf(
                args.checkpoint_dir,
                args.out_dir,
                dtype=args.dtype,
                pad_token_id=args.pad_token_id,
                tokenizer_dir=args.tokenizer_dir,
                max_shard_bytes=args.max_shard_size,
                mesh=mesh,
            )
            architecture = CAUSAL_LM_ARCHITECTURE if kind == "causal_lm" else SCORE_ARCHITECTURE
            print(f"wrote {architecture} {args.out_dir}: {', '.join(files)}")
            if args.verify:
                result = verify(args.out_dir, checkpoint_dir=args.checkpoint_dir, kind=kind, **verify_options)
                return _print_verify(result, args.tolerance)
        else:
            result = verify(args.hf_dir, checkpoint_dir=args.checkpoint, kind=args.kind, **verify_options)
            return _print_verify(result, args.tolerance)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"easyppo-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
