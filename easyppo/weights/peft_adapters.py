"""LoRA adapters in the Hugging Face ``peft`` format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft`` names an adapter of a projection after the projection's module (``...self_attn.q_proj``)
with ``lora_A.weight`` [r, in] and ``lora_B.weight`` [r, out] transposed like every torch linear
weight, under the ``base_model.model.`` prefix of its wrapper. easyppo's ``lora_a`` [in, r] and
``lora_b`` [r, out] are their transposes, and the two libraries compute the same update
(``alpha / r`` times the low-rank product; ``easyppo.models.lora``), so an adapter moves between them
by renaming and transposing, with nothing rescaled.

Reward and value models export their ``score`` head with the adapter (peft's ``modules_to_save``),
since a LoRA run trains it in full.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from easyppo.core import files, sharding
from easyppo.models import lora, partitioning
from easyppo.models.llama import LlamaConfig
from easyppo.weights import hf_mapping, hub
from easyppo.weights.huggingface import to_host

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_PEFT_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}
_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "reward": "SEQ_CLS", "value": "SEQ_CLS"}

PyTree = Any
Path = tuple[str, ...]


def _links(config: LlamaConfig, kind: str) -> Iterator[tuple[str, Path, int | None]]:
    """(peft tensor name, easyppo leaf path, layer row or None) of every tensor an adapter holds."""
    for link in hf_mapping.tensor_links(config.replace(lora=None), kind):
        module, leaf = link.path[-2], link.path[-1]
        if leaf == "kernel" and module in config.lora.targets:
            prefix = PEFT_PREFIX + link.hf_name.removesuffix(".weight")
            for ours, theirs in _PEFT_NAMES.items():
                yield f"{prefix}.{theirs}.weight", (*link.path[:-1], ours), link.layer
        elif link.path == ("score", "kernel"):
            yield PEFT_PREFIX + link.hf_name, link.path, None


def adapter_config(config: LlamaConfig, kind: str, *, base_model: str = "") -> dict[str, Any]:
    """The ``adapter_config.json`` peft reads for ``config.lora``."""
    spec = config.lora
    return {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES[kind],
        "base_model_name_or_path": base_model or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "modules_to_save": None if kind == "causal_lm" else ["score"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(directory: str, config: LlamaConfig, params: PyTree, kind: str, *, base_model: str = "") -> list[str]:
    """Writes the adapters (and a scalar head) of ``params`` as a peft adapter directory.

    ``params`` is the whole tree or only its trained part. Each tensor is gathered to the host in
    turn (call on every process of a multi-host job; process 0 writes). Returns the files written.
    """
    from safetensors.numpy import save_file

    if config.lora is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (model.lora.rank is 0)")
    flat = traverse_util.flatten_dict(params)
    tensors = {}
    for name, path, layer in _links(config, kind):
        if path not in flat:
            raise ValueError(f"save_adapter: the parameters have no {'/'.join(path)}")
        leaf = flat[path] if layer is None else flat[path][layer]
        tensors[name] = np.ascontiguousarray(to_host(leaf).T)
    if jax.process_index() == 0:
        with files.staged_directory(directory) as local:  # a remote directory is uploaded when complete
            os.makedirs(local, exist_ok=True)
            with open(os.path.join(local, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(adapter_config(config, kind, base_model=base_model), f, indent=2)
            save_file(tensors, os.path.join(local, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    return [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]


def check_adapter_config(directory: str, spec: lora.LoraConfig) -> None:
    """A local peft adapter directory holds an adapter ``spec`` describes (run validation calls this,
    so a wrong ``model.lora.init_from`` fails before any weight loads); remote ones are checked on load."""
    config_file = epath.Path(directory) / ADAPTER_CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"model.lora.init_from={directory!r}: no {ADAPTER_CONFIG_FILE} (not a peft adapter)")
    _check_config(json.loads(config_file.read_text()), spec, str(config_file))


def _check_config(found: dict[str, Any], spec: lora.LoraConfig, where: str) -> None:
    """The stored adapter must be the one ``model.lora`` describes: each mismatch names its field."""
    expected = {
        "peft_type": "LORA",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": sorted(spec.targets),
        "use_rslora": False,
        "use_dora": False,
    }
    for field, value in expected.items():
        stored = found.get(field, False if field.startswith("use_") else None)
        if field == "target_modules" and isinstance(stored, (list, str)):
            stored = sorted(stored) if isinstance(stored, list) else stored
        if field == "lora_alpha" and stored is not None:
            stored = float(stored)
        if stored != value:
            raise ValueError(
                f"{where}: {field}={stored!r} does not match this run's model.lora ({field} {value!r}); "
                "set model.lora to the adapter's settings"
            )
    for field in ("rank_pattern", "alpha_pattern"):
        if found.get(field):
            raise ValueError(f"{where}: {field} (per-module ranks or scales) is not supported")
    if found.get("layers_to_transform") is not None:
        raise ValueError(f"{where}: layers_to_transform (adapters on some layers only) is not supported")


def load_adapter(
    directory: str,
    config: LlamaConfig,
    kind: str,
    *,
    mesh: jax.sharding.Mesh,
    rules: sharding.PartitionRules = partitioning.LLAMA_RULES,
) -> dict:
    """The adapters (and any scalar head) of a peft adapter directory, sharded like the model's.

    The directory may be local, a URL or a hub name. Its ``adapter_config.json`` must match
    ``config.lora`` (rank, alpha, targets); every tensor's shape is checked before any is placed.
    """
    from safetensors import safe_open

    root = epath.Path(files.local_mirror(hub.local_source(directory, key="model.lora.init_from")))
    check_adapter_config(str(root), config.lora)
    weights = root / ADAPTER_WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"model.lora.init_from={directory!r}: no {ADAPTER_WEIGHTS_FILE}")
    abstract = traverse_util.flatten_dict(lora.split(hf_mapping.abstract_params(config, kind))[0])
    rows: dict[Path, dict[int | None, np.ndarray]] = {}
    with safe_open(os.fspath(weights), framework="numpy") as f:
        stored = set(f.keys())
        for name, path, layer in _links(config, kind):
            if name not in stored:
                if path == ("score", "kernel"):
                    continue  # an adapter without its head: the run's own head stays
                raise ValueError(f"{weights}: tensor {name} is missing")
            tensor = f.get_tensor(name).T
            want = abstract[path].shape if layer is None else abstract[path].shape[1:]
            if tuple(tensor.shape) != tuple(want):
                raise ValueError(
                    f"{weights}: tensor {name} has shape {list(tensor.T.shape)}, the model implies {list(want)[::-1]}"
                )
            rows.setdefault(path, {})[layer] = tensor.astype(abstract[path].dtype)
    leaves = {
        path: parts[None] if None in parts else np.stack([parts[i] for i in sorted(parts)])
        for path, parts in rows.items()
    }
    tree = traverse_util.unflatten_dict(leaves)
    shardings = sharding.named_shardings(tree, mesh, rules)
    return jax.tree.map(jax.device_put, tree, shardings)
