"""easyppo's own model checkpoint format, and whole conversions to and from Hugging Face.

An **easyppo model checkpoint** is an Orbax checkpoint of the parameter tree (``params/``) beside
``easyppo_model.json`` (architecture, parameter layout and model kind) and the tokenizer files.
Training runs restore it sharded onto their mesh with ``load_checkpoint``, whatever mesh it was
saved from; ``convert_hf_to_easyppo`` / ``convert_easyppo_to_hf`` move a model between this format
and a Hugging Face directory (``easyppo.weights.huggingface``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from easyppo.core import paths
from easyppo.core import sharding as sharding_lib
from easyppo.models.llama import LlamaConfig
from easyppo.weights import hf_files
from easyppo.weights.hf_mapping import abstract_params, architecture_kind, check_kind, dtype_name
from easyppo.weights.huggingface import _check_param_tree, _resolve_shardings, load_hf, save_hf

MODEL_METADATA_FILE = "easyppo_model.json"
PARAMS_DIR = "params"
_FORMAT_NAME = "easyppo-model"
_FORMAT_VERSION = 1

PyTree = Any


# Config fields that describe the stored tree (its dtype and whether layers are stacked) rather than
# how a run computes; ``dtype`` and ``remat`` are left to the run that restores the checkpoint.
_COMPUTE_ONLY_FIELDS = ("dtype", "remat")


def save_checkpoint(directory: str, config: LlamaConfig, params: PyTree, kind: str) -> None:
    """Saves ``params`` as an easyppo model checkpoint: Orbax ``params/`` plus ``easyppo_model.json``.

    The JSON (written last, so its presence means the checkpoint is complete) records the
    architecture, the parameter layout (``param_dtype``, ``scan_layers``) and the model kind, which is
    everything ``load_checkpoint`` needs to rebuild the tree and restore it onto any mesh.
    """
    check_kind(kind)
    directory = epath.Path(paths.resolve(directory))  # orbax needs an absolute path
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
    path = epath.Path(paths.resolve(directory)) / MODEL_METADATA_FILE
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
        config = config.replace(param_dtype=dtype_name(param_dtype))
    abstract = abstract_params(config, kind)
    shardings = _resolve_shardings(abstract, shardings, mesh, rules)
    target = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        shardings,
    )
    params = ocp.StandardCheckpointer().restore(epath.Path(paths.resolve(directory)) / PARAMS_DIR, target)
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
        kind = architecture_kind(hf_files.read_config(hf_dir), hf_dir) or "causal_lm"
    config, _, params = load_hf(hf_dir, kind, param_dtype=param_dtype, scan_layers=scan_layers, mesh=mesh)
    save_checkpoint(out_dir, config, params, kind)
    if jax.process_index() == 0:
        hf_files.copy_companion_files(hf_dir, out_dir)
    return config, kind


def convert_easyppo_to_hf(
    checkpoint_dir: str,
    out_dir: str,
    *,
    dtype: str | None = None,
    pad_token_id: int | None = None,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = hf_files.DEFAULT_MAX_SHARD_BYTES,
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
