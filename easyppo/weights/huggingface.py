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

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from easyppo.core import sharding as sharding_lib
from easyppo.core.files import local_mirror
from easyppo.models import partitioning
from easyppo.models.llama import LlamaConfig, make_model
from easyppo.weights import hf_files, hf_mapping

Path = tuple[str, ...]
PyTree = Any

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


def _check_hf_tensors(
    checkpoint: hf_files.HFCheckpoint, links: Sequence[hf_mapping.TensorLink], config: LlamaConfig
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
    redundant = {hf_mapping.LM_HEAD} if config.tie_word_embeddings else set()  # a tied head is the embedding
    unexpected = [
        name
        for name in checkpoint.names
        if name not in expected and name not in redundant and not hf_mapping.DERIVED_TENSOR.search(name)
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
    checkpoint: hf_files.HFCheckpoint, links: Sequence[hf_mapping.TensorLink], dtype: np.dtype
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """``index -> leaf[index]`` for ``jax.make_array_from_callback``, reading only that slice from disk.

    Replicated leaves ask for the same slice once per device; the memo reads it from disk once.
    """
    stacked = links[0].layer is not None
    memo: dict[tuple, np.ndarray] = {}

    def read_link(link: hf_mapping.TensorLink, index: tuple[slice, ...]) -> np.ndarray:
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
    links = hf_mapping.tensor_links(config, kind)
    _check_hf_tensors(checkpoint, links, config)
    abstract = traverse_util.flatten_dict(hf_mapping.abstract_params(config, kind))
    flat_shardings = traverse_util.flatten_dict(shardings)
    by_leaf = hf_mapping.links_by_leaf(links)
    params = {}
    for path, leaf in abstract.items():
        if path not in flat_shardings:
            raise ValueError(f"shardings has no entry for parameter {'/'.join(path)}")
        reader = _leaf_reader(checkpoint, by_leaf[path], np.dtype(leaf.dtype))
        params[path] = jax.make_array_from_callback(leaf.shape, flat_shardings[path], reader)
    return traverse_util.unflatten_dict(params)


def load_hf(
    path: str,
    kind: str = "causal_lm",
    *,
    param_dtype: str | None = None,
    dtype: str = "float32",
    scan_layers: bool = False,
    remat: str = "none",
    fuse_projections: bool = False,
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
    hf_mapping.check_kind(kind)
    path = local_mirror(path)  # safetensors maps local files: a gs:// directory is copied once
    hf_config = hf_files.read_config(path)
    hf_mapping.check_architecture(hf_config, path, kind)
    with hf_files.HFCheckpoint(path) as checkpoint:
        if param_dtype is None:
            if hf_mapping.EMBEDDING not in checkpoint:
                raise ValueError(f"tensor {hf_mapping.EMBEDDING!r} is missing from {checkpoint.describe_location()}")
            param_dtype = hf_mapping.dtype_name(checkpoint.info(hf_mapping.EMBEDDING).dtype)
        config = hf_mapping.config_from_hf(
            hf_config,
            path,
            param_dtype=hf_mapping.dtype_name(param_dtype),
            dtype=dtype,
            scan_layers=scan_layers,
            remat=remat,
        ).replace(fuse_projections=fuse_projections)
        shardings = _resolve_shardings(hf_mapping.abstract_params(config, kind), shardings, mesh, rules)
        params = _read_params(checkpoint, config, kind, shardings)
    return config, make_model(config, kind), params


# ---------------------------------------------------------------------------------------- saving


def to_host(x: Any) -> np.ndarray:
    """A parameter (or one row of it) as a host NumPy array, gathering it across processes if need be."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_tensor(leaf: Any, link: hf_mapping.TensorLink, dtype: np.dtype) -> np.ndarray:
    x = to_host(leaf if link.layer is None else leaf[link.layer])
    return (x.T if link.transpose else x).astype(dtype, copy=False)


def _check_param_tree(params: PyTree, config: LlamaConfig, kind: str) -> dict[Path, Any]:
    """The flattened ``params``, after checking they have exactly the paths and shapes of ``kind``."""
    flat = traverse_util.flatten_dict(nn.unbox(params))
    expected = traverse_util.flatten_dict(hf_mapping.abstract_params(config, kind))
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
    hf_mapping.check_kind(kind)
    if hf_files.existing_weight_files(path):
        raise FileExistsError(
            f"{path} already holds weights ({', '.join(hf_files.existing_weight_files(path))}); "
            "export into an empty directory"
        )
    flat = _check_param_tree(params, config, kind)
    if dtype is None:
        dtype = flat[("model", "embed_tokens", "embedding")].dtype
    out_dtype = np.dtype(hf_mapping.dtype_name(dtype))
    hf_config = hf_mapping.hf_config_dict(config, kind, dtype=out_dtype.name, pad_token_id=pad_token_id)
    planned = [
        hf_files.PlannedTensor(
            link.hf_name,
            link.hf_shape,
            out_dtype,
            functools.partial(_hf_tensor, flat[link.path], link, out_dtype),
        )
        for link in hf_mapping.tensor_links(config, kind)
    ]
    is_writer = jax.process_index() == 0
    files = hf_files.write_safetensors(path, planned, max_shard_bytes=max_shard_bytes, write=is_writer)
    if is_writer:
        hf_files.write_config(path, hf_config)
        if tokenizer_dir is not None:
            hf_files.copy_companion_files(tokenizer_dir, path)
    return files
