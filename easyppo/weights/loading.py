"""From the ``model`` section of a run config to a (config, module, sharded params) triple.

Every algorithm starts its models here, so there is one answer to "where do the weights come from":

* ``init_from=""``: random initialisation of ``preset`` (with any architecture overrides), born
  sharded on the mesh;
* a Hugging Face directory (has ``config.json``): ``easyppo.weights.huggingface.load_hf``;
* an easyppo model checkpoint (has ``easyppo_model.json``): ``easyppo.weights.model_checkpoint.load_checkpoint``;
* a train run's checkpoint directory (Orbax steps written by the train loop): the ``params`` of its
  latest step, with the architecture taken from the run's saved config.

A causal-LM checkpoint can start a reward or value model: the trunk is kept, the LM head dropped and
a fresh score head initialised. Reward and value models load each other's checkpoints directly.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import ml_collections
from etils import epath
from ml_collections import config_dict

from easyppo.core import paths, precision, sharding
from easyppo.core.options import OptionError, require
from easyppo.models import llama, lora, partitioning
from easyppo.weights import hf_mapping, hub, huggingface, model_checkpoint, peft_adapters, run_directory

ARCHITECTURE_OVERRIDES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def default_config() -> ml_collections.ConfigDict:
    """Every model option; an algorithm config holds one of these per model it trains or uses.

    Architecture overrides (None: the preset's or the checkpoint's value):

      vocab_size, hidden_size, intermediate_size, num_hidden_layers: change the preset (random init only)
      num_attention_heads, num_key_value_heads, tie_word_embeddings: change the preset (random init only)
      max_position_embeddings, bos_token_id, eos_token_id, pad_token_id: change the preset or a loaded model
    """
    c = ml_collections.ConfigDict()
    c.init_from = ""  # "": random init of `preset`; else a HF dir, easyppo checkpoint or run dir.
    c.preset = "tiny"  # Architecture for random init (see easyppo.models.llama.PRESETS).
    for name in ARCHITECTURE_OVERRIDES:  # Optional changes to the preset (random init only).
        setattr(c, name, config_dict.placeholder(bool if name == "tie_word_embeddings" else int))
    c.dtype = "float32"  # Compute dtype; "auto": bfloat16 on TPU, GPU and AMX CPUs, else float32.
    c.param_dtype = "float32"  # Master weights and optimizer state.
    c.remat = "none"  # One of easyppo.models.llama.REMAT_POLICIES.
    c.scan_layers = False  # nn.scan over layers: compile time independent of depth.
    c.fuse_projections = False  # QKV and gate/up as one matmul each (same parameters).
    c.lora = lora_default_config()
    return c


LORA_EXPORTS = ("merged", "peft", "both")


def lora_default_config() -> ml_collections.ConfigDict:
    """LoRA adapters on the model (``model.lora``; docs/lora.md). Rank 0 trains the whole model."""
    c = ml_collections.ConfigDict()
    c.rank = 0  # Adapter rank; 0: no adapters, every parameter is trained.
    c.alpha = 16.0  # The adapters' update is scaled by alpha / rank (peft's lora_alpha).
    c.dropout = 0.0  # Dropout on the adapters' input in training forward passes (peft's lora_dropout).
    c.targets = ",".join(lora.PROJECTIONS)  # Comma-separated projections that get adapters.
    c.init_from = ""  # A peft adapter directory to continue training from; '': fresh adapters.
    c.export = "merged"  # What an export writes: 'merged' HF weights, a 'peft' adapter, or 'both'.
    return c


def lora_config(cfg: ml_collections.ConfigDict) -> lora.LoraConfig | None:
    """The adapters a ``model`` config asks for (None: rank 0), checked with errors naming the key."""
    section = cfg.get("lora")
    if section is None or not section.rank:
        require(section is None or not section.init_from, "model.lora.init_from", "is set, but model.lora.rank is 0")
        return None
    require(section.rank > 0, "model.lora.rank", f"must be >= 0, got {section.rank}")
    require(section.alpha > 0, "model.lora.alpha", f"must be > 0, got {section.alpha}")
    require(0.0 <= section.dropout < 1.0, "model.lora.dropout", f"must be in [0, 1), got {section.dropout}")
    require(section.export in LORA_EXPORTS, "model.lora.export", f"{section.export!r} is not one of {LORA_EXPORTS}")
    targets = tuple(name.strip() for name in section.targets.split(",") if name.strip())
    unknown = sorted(set(targets) - set(lora.PROJECTIONS))
    require(
        bool(targets) and not unknown,
        "model.lora.targets",
        f"{section.targets!r} must name some of {', '.join(lora.PROJECTIONS)}",
    )
    spec = lora.LoraConfig(
        rank=section.rank, alpha=float(section.alpha), dropout=float(section.dropout), targets=targets
    )
    source = section.init_from
    local = (
        source
        and not paths.is_remote(source)
        and (epath.Path(paths.resolve(source)).exists() or not hub.is_hub_name(source))
    )
    if local:  # a URL or a hub name is checked when it is read
        try:
            peft_adapters.check_adapter_config(paths.resolve(source), spec)
        except (OSError, ValueError) as e:
            raise OptionError("model.lora.init_from", str(e).removeprefix(f"model.lora.init_from={source!r}: ")) from e
    return spec


# Overrides that change no parameter's shape, so they may also adjust a loaded model: Tulu 2 runs
# Llama 2 weights with an 8192-token context, and a checkpoint may lack a pad id.
SHAPE_FREE_OVERRIDES = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def frozen_config(cfg: ml_collections.ConfigDict, init_from: str = "") -> ml_collections.ConfigDict:
    """A copy of the ``model`` config ``cfg`` for a model that is never trained (a reference, a reward model).

    ``init_from`` replaces the weights' source if set. Remat is off: it only trades memory for
    recomputation in a backward pass, which a frozen model never has.
    """
    frozen = ml_collections.ConfigDict(cfg.to_dict())
    if init_from:
        frozen.init_from = init_from
    frozen.remat = "none"
    if "lora" in frozen:  # a frozen model has nothing to adapt
        frozen.lora.rank, frozen.lora.init_from = 0, ""
    return frozen


def _compute_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(
        dtype=precision.resolve_dtype(cfg.dtype),
        param_dtype=cfg.param_dtype,
        remat=cfg.remat,
        scan_layers=cfg.scan_layers,
        fuse_projections=cfg.fuse_projections,
    )


def resolve_architecture(cfg: ml_collections.ConfigDict) -> llama.LlamaConfig:
    """The architecture the ``model`` config describes, without touching any weights.

    With ``init_from`` set, the stored architecture counts; an override may change it only where no
    parameter shape depends on it (``SHAPE_FREE_OVERRIDES``), and any other override must agree with it.
    """
    compute = {**_compute_settings(cfg), "lora": lora_config(cfg)}
    if not cfg.init_from:
        overrides = {name: cfg[name] for name in ARCHITECTURE_OVERRIDES if cfg[name] is not None}
        return llama.get_preset(cfg.preset, **overrides, **compute)
    return _with_overrides(_stored_architecture(cfg).replace(**compute), cfg)


def _with_overrides(stored: llama.LlamaConfig, cfg: ml_collections.ConfigDict) -> llama.LlamaConfig:
    changes = {}
    for name in ARCHITECTURE_OVERRIDES:
        value = cfg[name]
        if value is None or value == getattr(stored, name):
            continue
        if name not in SHAPE_FREE_OVERRIDES:
            raise ValueError(
                f"model.{name}={value!r} differs from the {getattr(stored, name)!r} of model.init_from="
                f"{cfg.init_from!r}; a loaded model can only change {', '.join(SHAPE_FREE_OVERRIDES)}"
            )
        changes[name] = value
    return stored.replace(**changes) if changes else stored


def _stored_architecture(cfg: ml_collections.ConfigDict) -> llama.LlamaConfig:
    path = epath.Path(hub.local_source(cfg.init_from, key="model.init_from"))
    if not path.exists():
        raise FileNotFoundError(f"model.init_from={cfg.init_from!r} does not exist")
    return _read_architecture(str(path), _modification_stamp(path))


def _modification_stamp(path: epath.Path) -> float | None:
    """When ``path`` last changed (None where the filesystem does not say): part of the read cache's key,
    so a directory rewritten in place is read again."""
    try:
        return max(child.stat().mtime for child in (path, *path.iterdir()))
    except (OSError, AttributeError, NotImplementedError):
        return None


@functools.lru_cache(maxsize=64)
def _read_architecture(path: str, stamp: float | None) -> llama.LlamaConfig:
    """The architecture stored at ``path``, read once per run: validation, every model section of an
    algorithm and the loaders all ask, and a remote read costs a round trip each time."""
    del stamp  # only part of the cache key
    root = epath.Path(path)
    if (root / model_checkpoint.MODEL_METADATA_FILE).exists():
        config, _ = model_checkpoint.read_checkpoint_metadata(path)
        return config
    if (root / "config.json").exists():
        return llama.LlamaConfig.from_hf_dict(json.loads((root / "config.json").read_text()))
    if run_directory.is_run_directory(root):
        return resolve_architecture(ml_collections.ConfigDict(run_directory.read_run_config(root)["model"]))
    raise ValueError(
        f"model.init_from={path!r} is neither a Hugging Face directory (config.json), an easyppo "
        f"model checkpoint ({model_checkpoint.MODEL_METADATA_FILE}) nor a train run's checkpoint directory"
    )


def load_model(
    cfg: ml_collections.ConfigDict,
    kind: str,
    *,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    rules: sharding.PartitionRules = partitioning.LLAMA_RULES,
    abstract: bool = False,
) -> tuple[llama.LlamaConfig, Any, dict]:
    """Builds the ``kind`` model ("causal_lm" | "reward" | "value") with sharded float params.

    With ``abstract=True`` no weights are read or initialised: the params are ``ShapeDtypeStruct``s
    carrying their shardings, exactly what the loaded params would be. A resumed run builds its
    trained models this way, since the checkpoint replaces their weights anyway.
    """
    config = resolve_architecture(cfg)
    partitioning.check_model_fits_mesh(config, mesh)
    module = llama.make_model(config, kind)
    if abstract:
        return config, module, abstract_params(config, kind, mesh, rules)
    # The base is built without adapters, so it is the same tree, with the same values, as a run
    # without LoRA gets (a scanned stack initialises differently once its layers hold adapters).
    params = _load_base(cfg, config.replace(lora=None), kind, mesh=mesh, rng=rng, rules=rules)
    if config.lora is None:
        return config, module, params
    if cfg.lora.init_from:
        adapters = peft_adapters.load_adapter(cfg.lora.init_from, config, kind, mesh=mesh, rules=rules)
    else:
        adapters = sharding.sharded_init(_adapter_initializer(config, kind), rng, mesh=mesh, rules=rules)
    return config, module, lora.merge(adapters, params)


def _load_base(cfg, config: llama.LlamaConfig, kind: str, *, mesh, rng, rules) -> dict:
    fresh = _initializer(config, "reward" if kind == "value" else kind)  # identical trees and values
    if not cfg.init_from:
        return sharding.sharded_init(fresh, rng, mesh=mesh, rules=rules)
    loaded_kind, loaded = _load_weights(cfg, config, kind, mesh, rules)
    if loaded_kind == kind or {loaded_kind, kind} == {"reward", "value"}:
        return loaded
    if loaded_kind == "causal_lm":  # new scalar head on a pretrained trunk
        head = sharding.sharded_init(lambda key: {"score": fresh(key)["score"]}, rng, mesh=mesh, rules=rules)
        return {"model": loaded["model"], **head}
    raise ValueError(
        f"model.init_from={cfg.init_from!r} holds a {loaded_kind} model, which cannot start a {kind} model"
    )


def load_trained(
    cfg: ml_collections.ConfigDict,
    kind: str,
    *,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    resuming: bool,
    abstract: bool = False,
) -> tuple[llama.LlamaConfig, Any, dict, dict | None]:
    """A model a run trains: ``(config, module, trained params, frozen base)``.

    Without LoRA every parameter is trained and the base is None; with it, the adapters (and a
    scalar head) and the rest (``lora.split``). Nothing is read when planning (``abstract``) or
    when resuming a run that trains every weight (the checkpoint supplies them); a LoRA model's
    frozen base is always read.
    """
    lazy = abstract or (resuming and lora_config(cfg) is None)
    config, module, params = load_model(cfg, kind, mesh=mesh, rng=rng, abstract=lazy)
    if config.lora is None:
        return config, module, params, None
    trained, base = lora.split(params)
    return config, module, trained, base


@functools.cache
def _adapter_initializer(config: llama.LlamaConfig, kind: str):
    """``key -> adapters`` of ``config``'s LoRA (the base's initialisation is traced, and discarded)."""
    module = llama.make_model(config, kind)
    return lambda key: lora.adapters(module.init(key, jax.numpy.zeros((1, 8), "int32"))["params"])


@functools.cache
def _initializer(config: llama.LlamaConfig, kind: str):
    """``key -> params`` of a fresh ``kind`` model, one function object per architecture and kind.

    ``jax.jit`` reuses a compilation for the same function object, so the models of one run that
    share a parameter tree (a policy and its reference; a reward model and the value model, whose
    trees and initial values are identical, so both use the "reward" initialiser) compile it once.
    """
    module = llama.make_model(config, kind)
    return lambda key: module.init(key, jax.numpy.zeros((1, 8), "int32"))["params"]


def abstract_params(
    config: llama.LlamaConfig,
    kind: str,
    mesh: jax.sharding.Mesh,
    rules: sharding.PartitionRules = partitioning.LLAMA_RULES,
) -> dict:
    """Shapes, dtypes and shardings of ``kind``'s parameters for ``config``, allocating nothing."""
    shapes = llama.abstract_params(config, kind)
    return sharding.with_shardings(shapes, sharding.named_shardings(shapes, mesh, rules))


def stored_model_kind(path: str) -> str | None:
    """What the weights at ``path`` are: "causal_lm", "reward" or "value" (None: a HF config that does not say).

    The one answer for every source: an easyppo model checkpoint's metadata, a Hugging Face
    ``config.json``'s architecture, or a run directory's checkpoint metadata. Runs from before the
    kind was recorded are read by their tree: a ``score`` head means a reward (or value) model.
    """
    root = epath.Path(path)
    if (root / model_checkpoint.MODEL_METADATA_FILE).exists():
        return model_checkpoint.read_checkpoint_metadata(path)[1]
    if (root / "config.json").exists():
        return hf_mapping.architecture_kind(json.loads((root / "config.json").read_text()), path)
    kind = run_directory.read_run_metadata(path).get("model_kind")
    if kind is None:
        kind = "reward" if "score" in run_directory.stored_param_names(path) else "causal_lm"
    return kind


def _load_weights(cfg, config, kind, mesh, rules) -> tuple[str, dict]:
    path = epath.Path(hub.local_source(cfg.init_from, key="model.init_from"))
    stored = stored_model_kind(str(path))
    if (path / model_checkpoint.MODEL_METADATA_FILE).exists():
        _, _, params = model_checkpoint.load_checkpoint(str(path), mesh=mesh, rules=rules, param_dtype=cfg.param_dtype)
        return stored, _relayout(params, config)
    if (path / "config.json").exists():
        # A sequence-classification head serves as whichever scalar model is wanted.
        loaded_kind = "causal_lm" if stored == "causal_lm" else kind if kind != "causal_lm" else "reward"
        _, _, params = huggingface.load_hf(str(path), loaded_kind, mesh=mesh, rules=rules, **_compute_settings(cfg))
        return loaded_kind, params
    run_model = ml_collections.ConfigDict(run_directory.read_run_config(path)["model"])
    if lora_config(run_model) is None:
        target = abstract_params(config, stored, mesh, rules)
        return stored, run_directory.restore_subtree(path, {"params": target})["params"]
    return stored, _relayout(run_model_params(str(path), stored, mesh=mesh, rules=rules), config)


def run_model_params(
    path: str,
    kind: str,
    *,
    mesh: jax.sharding.Mesh,
    rules: sharding.PartitionRules = partitioning.LLAMA_RULES,
    step: int | None = None,
) -> dict:
    """The trained model of a run's saved ``step`` (default: the latest), as plain weights.

    A LoRA run checkpoints only what it trains; its base is read again from the run's own
    ``model.init_from`` (or initialised again from its seed) and the adapters are folded into it
    (``lora.merged_weights``), so the result is a model without adapters.
    """
    run = ml_collections.ConfigDict(run_directory.read_run_config(path, step))
    architecture = resolve_architecture(run.model)
    trained = run_trained_params(path, architecture, kind, mesh=mesh, rules=rules, step=step)
    if architecture.lora is None:
        return trained
    rng = jax.random.key(run.seed)
    base = _load_base(run.model, architecture.replace(lora=None), kind, mesh=mesh, rng=rng, rules=rules)
    return lora.merged_weights(lora.merge(trained, base), architecture.lora)


def run_trained_params(
    path: str,
    architecture: llama.LlamaConfig,
    kind: str,
    *,
    mesh: jax.sharding.Mesh,
    rules: sharding.PartitionRules = partitioning.LLAMA_RULES,
    step: int | None = None,
) -> dict:
    """What a run with this ``architecture`` checkpointed as its ``params``: the whole model, or a
    LoRA run's adapters (and scalar head)."""
    target = abstract_params(architecture, kind, mesh, rules)
    if architecture.lora is not None:
        target = lora.split(target)[0]
    return run_directory.restore_subtree(path, {"params": target}, step=step)["params"]


def _relayout(params: dict, config: llama.LlamaConfig) -> dict:
    """Stacks or unstacks layers when the checkpoint's layout differs from ``config.scan_layers``."""
    has_stack = "layers" in params["model"]
    if config.scan_layers and not has_stack:
        return llama.stack_layers(params, config.num_hidden_layers)
    if not config.scan_layers and has_stack:
        return llama.unstack_layers(params, config.num_hidden_layers)
    return params
