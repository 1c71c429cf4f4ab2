"""Planning a generation run before any weight is read: where the tokenizer and chat format come from,
the prompts through the data pipeline, the models' architectures, lengths and the mesh checked.

Everything that can be wrong is found here, naming the flag (or the prompts file's row and field).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from etils import epath

from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.data.chat import ChatFormat
from easyppo.data.errors import BadRowsError, DataConfigError
from easyppo.data.tokenizer import SENTENCEPIECE_MODEL, TOKENIZER_JSON, Tokenizer, trained_with_other_vocabulary
from easyppo.models import generation, llama, partitioning
from easyppo.run.generate_options import (
    DEFAULT_CHAT_FORMAT,
    DEFAULT_MAX_NEW_TOKENS,
    GenerateOptions,
    OptionError,
    check_options,
    prompts_per_batch,
    sampling_config,
)
from easyppo.weights import loading, run_directory

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizerSource:
    """Which tokenizer (with any special-id settings) and chat format to use, and where they came from."""

    path: str
    chat_format: str
    bos_id: int | str | None = None
    eos_id: int | str | None = None
    pad_id: int | str | None = None
    origin: str = ""


def _holds_tokenizer(directory: str) -> bool:
    path = epath.Path(directory)
    return path.is_dir() and any((path / name).exists() for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL))


def resolve_tokenizer_source(options: GenerateOptions) -> TokenizerSource:
    """The tokenizer and chat format: the flags, else the checkpoint's own files, else its run config's.

    Raises:
      OptionError: no tokenizer was given and the checkpoint neither holds nor names one.
    """
    run_data: Mapping[str, Any] = {}
    if run_directory.is_run_directory(options.checkpoint):
        run_data = run_directory.read_run_config(options.checkpoint).get("data", {})
    chat_format = options.chat_format or run_data.get("chat_format") or DEFAULT_CHAT_FORMAT
    if options.tokenizer:
        return TokenizerSource(options.tokenizer, chat_format, pad_id=options.pad_id, origin="--tokenizer")
    if _holds_tokenizer(options.checkpoint):
        return TokenizerSource(options.checkpoint, chat_format, pad_id=options.pad_id, origin="--checkpoint")
    if run_data.get("tokenizer_path"):
        return TokenizerSource(
            run_data["tokenizer_path"],
            chat_format,
            bos_id=run_data.get("bos_id"),
            eos_id=run_data.get("eos_id"),
            pad_id=options.pad_id if options.pad_id is not None else run_data.get("pad_id"),
            origin="the run config's data.tokenizer_path",
        )
    raise OptionError(
        "tokenizer",
        f"not given, and {options.checkpoint} holds no tokenizer files ({TOKENIZER_JSON} or "
        f"{SENTENCEPIECE_MODEL}) and is not a train run directory naming one; pass --tokenizer=PATH",
    )


def _data_config(
    options: GenerateOptions, source: TokenizerSource, global_batch_size: int
) -> ml_collections.ConfigDict:
    cfg = pipeline.default_config()
    cfg.path = options.prompts
    cfg.kind = "prompt"
    cfg.tokenizer_path = source.path
    cfg.chat_format = source.chat_format
    cfg.bos_id, cfg.eos_id, cfg.pad_id = source.bos_id, source.eos_id, source.pad_id
    cfg.max_prompt_len = options.max_prompt_len
    cfg.truncation = options.truncation
    cfg.global_batch_size = global_batch_size
    cfg.shuffle = False  # file order, so the output follows the prompts
    cfg.drop_remainder = False  # the last batch is completed with masked filler rows
    cfg.num_epochs = 1
    cfg.seed = options.seed
    cfg.cache_dir = options.cache_dir
    cfg.num_proc = options.num_proc
    return cfg


# The data options this CLI sets from its own flags, so that their errors name the flag.
_FLAG_OF_DATA_KEY = {
    "tokenizer_path": "tokenizer",
    "chat_format": "chat_format",
    "max_prompt_len": "max_prompt_len",
    "truncation": "truncation",
    "bos_id": "tokenizer",
    "eos_id": "tokenizer",
    "pad_id": "pad_id",
    "num_proc": "num_proc",
    "path": "prompts",
}


def _as_option_error(error: DataConfigError) -> OptionError:
    return OptionError(_FLAG_OF_DATA_KEY.get(error.key, "prompts"), error.detail)


def _bad_prompts_headline(error: BadRowsError, options: GenerateOptions) -> str:
    if error.errors:
        return f"{len(error.errors)} of {error.num_rows} prompt rows are malformed"
    return (
        f"no prompt is left: all {error.num_rows} are longer than --max_prompt_len={options.max_prompt_len}, "
        f"and --truncation={options.truncation} leaves them out"
    )


def _model_config(path: str, dtype: str) -> ml_collections.ConfigDict:
    cfg = loading.default_config()
    cfg.init_from = path
    cfg.dtype = cfg.param_dtype = dtype
    return cfg


def _resolve_model(
    flag: str, path: str, dtype: str, wanted: str
) -> tuple[ml_collections.ConfigDict, llama.LlamaConfig]:
    """The model config section and architecture for ``--flag=path``, read without loading weights.

    The stored kind is checked here because ``load_model`` would start a reward model from a causal
    LM with a *fresh random* score head, which is right for training and silently wrong for scoring.
    """
    if not epath.Path(path).exists():
        raise OptionError(flag, f"{path} does not exist")
    cfg = _model_config(path, dtype)
    try:
        architecture = loading.resolve_architecture(cfg)
        kind = loading.stored_model_kind(path)
    except (OSError, ValueError, KeyError) as e:
        raise OptionError(flag, str(e)) from e
    if kind is not None and kind != wanted:
        raise OptionError(flag, f"{path} holds a {kind} model, but a {wanted} model is needed here")
    return cfg, architecture


def _check_model(
    flag: str,
    architecture: llama.LlamaConfig,
    tokenizer: Tokenizer,
    prompt_len: int,
    max_new_tokens: int,
    mesh: jax.sharding.Mesh,
) -> None:
    """Fails, naming ``--flag``, if the model cannot read this tokenizer's ids, these lengths or the mesh."""
    if tokenizer.vocab_size > architecture.vocab_size:
        raise OptionError(
            flag,
            f"the model's vocab_size={architecture.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens ({tokenizer.source}); is this the right tokenizer?",
        )
    if prompt_len + max_new_tokens > architecture.max_position_embeddings:
        raise OptionError(
            flag,
            f"the longest prompt ({prompt_len} tokens) + --max_new_tokens={max_new_tokens} exceeds the "
            f"model's max_position_embeddings={architecture.max_position_embeddings}; lower --max_prompt_len "
            "or --max_new_tokens",
        )
    try:
        partitioning.check_model_fits_mesh(architecture, mesh)
    except ValueError as e:
        raise OptionError(flag, str(e)) from e


def longest_prompt(data: pipeline.PreparedData) -> int:
    """Tokens in the longest usable prompt (after truncation): the padded width every batch gets."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = data.batcher.table.column("prompt_ids").take(pa.array(data.batcher.rows))
    return int(pc.max(pc.list_value_length(column)).as_py())


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything decided and checked before any weights load (see :func:`plan_run`)."""

    options: GenerateOptions
    mesh: jax.sharding.Mesh
    tokenizer: Tokenizer
    chat_format: ChatFormat
    data: pipeline.PreparedData
    data_config: ml_collections.ConfigDict
    prompt_width: int  # every batch's prompts are left-padded to this many columns
    sampling: generation.SamplingConfig
    policy_config: ml_collections.ConfigDict
    reward_config: ml_collections.ConfigDict | None


def plan_run(options: GenerateOptions) -> Plan:
    """Checks the options, reads the model configs and tokenises the prompts; loads no weights.

    Raises:
      OptionError: a bad option, or a missing / unsuitable checkpoint or tokenizer (names the flag).
      BadRowsError / RowError: malformed or unreadable prompts (names the file, row and field).
    """
    check_options(options)
    policy_cfg, policy_architecture = _resolve_model("checkpoint", options.checkpoint, options.dtype, "causal_lm")
    reward_cfg = reward_architecture = None
    if options.reward_model:
        reward_cfg, reward_architecture = _resolve_model("reward_model", options.reward_model, options.dtype, "reward")
    mesh = sharding.make_mesh(sharding.default_config())
    per_batch = prompts_per_batch(
        options.batch_size, options.num_samples, sharding.batch_parallelism(mesh), jax.process_count()
    )

    source = resolve_tokenizer_source(options)
    data_cfg = _data_config(options, source, per_batch)
    try:
        tokenizer, chat_format = pipeline.load_tokenizer_and_format(data_cfg)
    except DataConfigError as e:
        raise _as_option_error(e) from e
    if options.reward_model and trained_with_other_vocabulary(tokenizer, options.reward_model):
        raise OptionError(
            "reward_model",
            f"{options.reward_model} was trained with another tokenizer than the policy's ({source.path}); "
            "the reward model must read the policy's token ids",
        )
    try:
        data = pipeline.prepare_data(data_cfg, tokenizer=tokenizer, chat_format=chat_format)
    except DataConfigError as e:
        raise _as_option_error(e) from e
    except BadRowsError as e:  # the pipeline's headline suggests data.* settings this CLI has no flags for
        raise BadRowsError(e.errors, e.num_rows, headline=_bad_prompts_headline(e, options)) from e
    logger.info("tokenizer %s (from %s), chat format %s", source.path, source.origin, source.chat_format)
    logger.info("prompts %s: %s; %d prompts per batch", options.prompts, data.stats, per_batch)

    width = longest_prompt(data)
    architectures = {"checkpoint": policy_architecture, "reward_model": reward_architecture}
    architectures = {flag: arch for flag, arch in architectures.items() if arch is not None}
    if options.max_new_tokens is None:  # as many as the default, or as the shortest model has room for
        room = min(arch.max_position_embeddings for arch in architectures.values()) - width
        options = dataclasses.replace(options, max_new_tokens=max(1, min(DEFAULT_MAX_NEW_TOKENS, room)))
    for flag, architecture in architectures.items():
        _check_model(flag, architecture, tokenizer, width, options.max_new_tokens, mesh)
    if options.greedy and options.num_samples > 1:
        logger.warning("--greedy with --num_samples=%d: every sample of a prompt is the same", options.num_samples)
    return Plan(
        options=options,
        mesh=mesh,
        tokenizer=tokenizer,
        chat_format=chat_format,
        data=data,
        data_config=data_cfg,
        prompt_width=width,
        sampling=sampling_config(options, tokenizer, chat_format, policy_architecture),
        policy_config=policy_cfg,
        reward_config=reward_cfg,
    )
