"""Exporting any saved step of a train run as a Hugging Face directory (``easyppo convert to-hf RUN``).

A run exports its final model itself (``train.export_hf_dir``); this is for a run that finished
without one, or for an earlier step. Everything comes from the run's own checkpoint: the resolved
config saved with the step (architecture, parameter layout, tokenizer and chat format), the kind of
model it trained, and the parameters, restored onto one device or split over a mesh. The export gets
the tokenizer files, the chat template and the generation config, as a run's own export does.
"""

from __future__ import annotations

import jax
import ml_collections

from easyppo.core import paths
from easyppo.core import sharding as sharding_lib
from easyppo.data import pipeline
from easyppo.data.export import save_tokenizer_files
from easyppo.models import llama
from easyppo.weights import hf_files, huggingface, loading, peft_adapters, run_directory


def export_run_checkpoint(
    run_dir: str,
    out_dir: str,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = hf_files.DEFAULT_MAX_SHARD_BYTES,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[llama.LlamaConfig, str, list[str]]:
    """The trained model of ``step`` (default: the latest) of the run checkpointed in ``run_dir`` ->
    a Hugging Face directory. Returns ``(architecture, kind, files written)``.

    ``run_dir`` is the run's checkpoint directory (``<output_dir>/checkpoints``) or its output
    directory. A PPO run's value model is not exported (its policy is the run's model).
    """
    run_dir, run, kind, architecture, mesh = _open_run(run_dir, step, mesh)
    tokenizer, chat_format = pipeline.load_tokenizer_and_format(run.data) if run.data.tokenizer_path else (None, None)
    params = loading.run_model_params(run_dir, kind, mesh=mesh, step=step)
    architecture = architecture.replace(lora=None)  # a LoRA run's adapters are folded into its weights
    pad_id = tokenizer.pad_id if tokenizer is not None else architecture.pad_token_id
    files = huggingface.save_hf(
        out_dir, architecture, params, kind, dtype=dtype, pad_token_id=pad_id, max_shard_bytes=max_shard_bytes
    )
    if jax.process_index() == 0 and tokenizer is not None:
        save_tokenizer_files(run.data.tokenizer_path, tokenizer, out_dir, chat_format)
    return architecture, kind, files


def export_run_adapter(
    run_dir: str, out_dir: str, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> tuple[str, list[str]]:
    """The LoRA adapter of ``step`` (default: the latest) of a LoRA run -> a ``peft`` adapter directory,
    recording the run's ``model.init_from`` as its base. Returns ``(kind, files written)``."""
    run_dir, run, kind, architecture, mesh = _open_run(run_dir, step, mesh)
    if architecture.lora is None:
        raise ValueError(f"{run_dir} trained the whole model (model.lora.rank is 0): it has no adapter to export")
    trained = loading.run_trained_params(run_dir, architecture, kind, mesh=mesh, step=step)
    files = peft_adapters.save_adapter(out_dir, architecture, trained, kind, base_model=run.model.init_from)
    return kind, files


def _open_run(run_dir: str, step: int | None, mesh: jax.sharding.Mesh | None):
    """(checkpoint directory, saved config, model kind, architecture, mesh) of a run's ``step``."""
    run_dir = paths.resolve(run_dir)
    if not run_directory.is_run_directory(run_dir) and run_directory.is_run_directory(f"{run_dir}/checkpoints"):
        run_dir = f"{run_dir}/checkpoints"
    if not run_directory.is_run_directory(run_dir):
        raise FileNotFoundError(f"{run_dir} holds no train-run checkpoint step")
    run = ml_collections.ConfigDict(run_directory.read_run_config(run_dir, step))
    kind = run_directory.read_run_metadata(run_dir, step).get("model_kind") or loading.stored_model_kind(run_dir)
    architecture = loading.resolve_architecture(run.model)
    mesh = mesh or sharding_lib.make_mesh(
        ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1]
    )
    return run_dir, run, kind, architecture, mesh
