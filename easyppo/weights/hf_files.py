"""File-level I/O for Hugging Face model directories: reading tensors, writing shards, config, tokenizer.

This module knows the *files* of a Hugging Face checkpoint, not the model: which names live in which
file, how to read a slice of one tensor without reading the rest, and how to write a set of tensors
as size-capped safetensors shards with an index. ``easyppo.weights.huggingface`` owns the mapping between those
names and easyppo's parameter tree.

Reading is lazy on purpose: ``safetensors``' ``get_slice`` (and a memory-mapped ``torch.load`` for
``.bin`` files) returns only the bytes a device's shard needs, so a converted 70B model is assembled
shard by shard and never sits whole in one host's memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from easyppo.core.files import copy_file

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"

# Files that travel with the weights: the tokenizer in its several formats, the chat template and the
# generation defaults. Copied verbatim by the converter in both directions when present.
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# Hugging Face's own default shard size for ``save_pretrained``: small enough to upload and download
# in one piece, large enough that a 70B model is a few dozen files.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

Index = tuple[slice, ...]


# -------------------------------------------------------------------------------------------- config


def read_config(model_dir: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model directory, with a clear error if absent."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a directory (expected a Hugging Face model directory)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a Hugging Face model directory needs a config.json")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def write_config(model_dir: str, config: dict[str, Any]) -> None:
    """Writes ``config.json`` through ``transformers``' ``LlamaConfig`` when it is installed.

    Going through the config class fills in every default the installed ``transformers`` expects
    (and its current key names, e.g. ``rope_parameters``), so the file reads back exactly as
    ``save_pretrained`` would have written it. Without ``transformers`` the dict is written as plain
    JSON in the long-standing format (``rope_theta`` / ``rope_scaling`` / ``torch_dtype``), which
    every ``transformers`` release still reads.
    """
    os.makedirs(model_dir, exist_ok=True)
    try:
        from transformers import LlamaConfig as HFLlamaConfig
    except ImportError:
        HFLlamaConfig = None
    if HFLlamaConfig is not None:
        HFLlamaConfig(**config).save_pretrained(model_dir)
        return
    plain = dict(config)
    num_labels = plain.pop("num_labels", None)
    if num_labels is not None:
        plain["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        plain["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    if "dtype" in plain:
        plain["torch_dtype"] = plain.pop("dtype")
    with open(os.path.join(model_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(plain, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_companion_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies the tokenizer / chat-template / generation files present in ``src_dir``; returns their names."""
    copied = []
    source, target = epath.Path(src_dir), epath.Path(dst_dir)  # either may be remote (gs://...)
    target.mkdir(parents=True, exist_ok=True)
    for name in COMPANION_FILES:
        if (source / name).is_file():
            copy_file(source / name, target / name)
            copied.append(name)
    return copied


# ------------------------------------------------------------------------------------------- reading


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU torch tensor as NumPy; bfloat16 goes through its bit pattern (NumPy has no native bf16)."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def _load_torch_state_dict(path: str) -> Any:
    """``torch.load`` memory-mapped (tensors are paged in when read), tensors only (no code runs).

    Files from torch < 1.6 use the legacy format, which cannot be memory-mapped; those are read whole.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not memory-mappable (legacy format) or not a state dict: the retry tells which
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or non-tensor pickle
        raise ValueError(f"cannot read {path} as a torch state dict: {e}") from e


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it looks like, known without reading its data."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: np.dtype


class HFCheckpoint:
    """The tensors of a Hugging Face model directory, read lazily, by name, whole or by slice.

    Accepts the four layouts ``save_pretrained`` produces: ``model.safetensors``, sharded safetensors
    with ``model.safetensors.index.json``, ``pytorch_model.bin`` and sharded ``.bin`` with its index
    (safetensors win when both are present). ``.bin`` files are memory-mapped (``torch.load(mmap=True,
    weights_only=True)``), so they too are read one tensor at a time. Use as a context manager, or
    call ``close()``.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.format, files, weight_map = self._discover(model_dir)
        self._handles: dict[str, Any] = {}
        self._info: dict[str, TensorInfo] = {}
        for file in files:
            self._index_file(file)
        for name, file in (weight_map or {}).items():
            if name not in self._info or self._info[name].file != file:
                raise ValueError(f"the index in {model_dir} maps tensor {name!r} to {file}, which does not contain it")

    # Discovery --------------------------------------------------------------------------------
    @staticmethod
    def _discover(model_dir: str) -> tuple[str, list[str], dict[str, str] | None]:
        """Picks the weight format: ``(format, files, {tensor name: file} from the index or None)``."""
        for fmt, single, index_name in (
            ("safetensors", SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE),
            ("torch", TORCH_FILE, TORCH_INDEX_FILE),
        ):
            index_path = os.path.join(model_dir, index_name)
            if os.path.isfile(index_path):
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index_path} has no 'weight_map' object")
                files = list(dict.fromkeys(weight_map.values()))
                for file in files:
                    if not os.path.isfile(os.path.join(model_dir, file)):
                        raise FileNotFoundError(f"{index_path} lists shard {file}, which is not in {model_dir}")
                return fmt, files, weight_map
            if os.path.isfile(os.path.join(model_dir, single)):
                return fmt, [single], None
        raise FileNotFoundError(
            f"no weights in {model_dir}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE}, "
            f"{TORCH_FILE} or {TORCH_INDEX_FILE}"
        )

    def _index_file(self, file: str) -> None:
        path = os.path.join(self.model_dir, file)
        if self.format == "safetensors":
            from safetensors import safe_open

            handle = safe_open(path, framework="numpy")
            self._handles[file] = handle
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sl = handle.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ValueError(f"tensor {name!r} in {path} has unsupported dtype {sl.get_dtype()}")
                self._info[name] = TensorInfo(name, file, tuple(sl.get_shape()), dtype)
        else:
            import torch

            state = _load_torch_state_dict(path)
            if not isinstance(state, dict):
                raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
            self._handles[file] = state
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor):
                    raise ValueError(f"entry {name!r} of {path} is a {type(tensor).__name__}, not a tensor")
                dtype = _torch_to_numpy(torch.empty(0, dtype=tensor.dtype)).dtype
                self._info[name] = TensorInfo(name, file, tuple(tensor.shape), dtype)

    # Access -----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def describe_location(self, name: str | None = None) -> str:
        """The file a tensor lives in, or (for a missing tensor) where it was looked for."""
        if name is not None and name in self._info:
            return os.path.join(self.model_dir, self._info[name].file)
        files = sorted({i.file for i in self._info.values()})
        if len(files) == 1:
            return os.path.join(self.model_dir, files[0])
        index = SAFETENSORS_INDEX_FILE if self.format == "safetensors" else TORCH_INDEX_FILE
        return os.path.join(self.model_dir, index)

    def info(self, name: str) -> TensorInfo:
        if name not in self._info:
            raise KeyError(f"tensor {name!r} not found in {self.describe_location()}")
        return self._info[name]

    def read(self, name: str, index: Index | None = None) -> np.ndarray:
        """The tensor ``name`` (or just ``tensor[index]``), read from disk as NumPy in its stored dtype."""
        info = self.info(name)
        handle = self._handles[info.file]
        if self.format == "safetensors":
            if index is None:
                return handle.get_tensor(name)
            return np.asarray(handle.get_slice(name)[index])
        tensor = handle[name]
        return _torch_to_numpy(tensor if index is None else tensor[index])

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: name, shape and dtype known up front; data produced only when its shard is."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Groups tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    shards: list[list[PlannedTensor]] = []
    current: list[PlannedTensor] = []
    size = 0
    for tensor in tensors:
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def _shard_file_name(i: int, count: int) -> str:
    if count == 1:
        return SAFETENSORS_FILE
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_safetensors(
    model_dir: str,
    tensors: Sequence[PlannedTensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    write: bool = True,
) -> list[str]:
    """Writes ``tensors`` as ``model.safetensors``, or as numbered shards plus an index above the cap.

    Only one shard's tensors are in host memory at a time. Every tensor's ``produce`` is called even
    when ``write`` is False: in a multi-host job every process must take part in gathering a sharded
    parameter, while only one of them writes. Returns the file names written.
    """
    from safetensors.numpy import save_file

    shards = plan_shards(tensors, max_shard_bytes)
    files = [_shard_file_name(i, len(shards)) for i in range(len(shards))]
    if write:
        os.makedirs(model_dir, exist_ok=True)
    for file, shard in zip(files, shards):
        arrays = {}
        for tensor in shard:
            array = np.ascontiguousarray(tensor.produce())
            if array.shape != tensor.shape or array.dtype != tensor.dtype:
                raise AssertionError(
                    f"{tensor.name}: produced {array.dtype}{list(array.shape)}, planned "
                    f"{np.dtype(tensor.dtype)}{list(tensor.shape)}"
                )
            arrays[tensor.name] = array
        if write:
            save_file(arrays, os.path.join(model_dir, file), metadata={"format": "pt"})
        del arrays
    if write and len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: file for file, shard in zip(files, shards) for t in shard},
        }
        with open(os.path.join(model_dir, SAFETENSORS_INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    return files


def existing_weight_files(model_dir: str) -> list[str]:
    """Weight files and indexes already in ``model_dir``: writing beside them would mix two models."""
    if not os.path.isdir(model_dir):
        return []
    weight_files = []
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".safetensors", ".bin")) or name in (SAFETENSORS_INDEX_FILE, TORCH_INDEX_FILE):
            weight_files.append(name)
    return weight_files
