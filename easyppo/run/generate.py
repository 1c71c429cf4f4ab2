"""Sample completions for a file of prompts, optionally scored by a reward model.

    easyppo generate --checkpoint=runs/demo/sft/hf --prompts=prompts.jsonl --output=out.jsonl \\
        [--tokenizer=PATH] [--chat_format=tulu|llama3|tokenizer|plain] [--reward_model=DIR] \\
        [--max_new_tokens=128] [--temperature=0.7] [--top_p=1.0] [--top_k=0] [--greedy] \\
        [--num_samples=1] [--batch_size=8] [--max_prompt_len=512] [--truncation=truncate] \\
        [--seed=0] [--dtype=float32] [--pad_id=ID] [--no_progress] [--cache_dir=DIR] [--num_proc=4]

``generate_file(GenerateOptions(...))`` does the same from Python and returns a ``GenerateSummary``.

Each output line is one (prompt, sample) pair, in prompt order then sample order::

    {"index": 3, "sample": 0, "prompt": "<s><|user|>\\nHi\\n<|assistant|>\\n", "response": "Hello!",
     "response_tokens": 3, "finished": true, "score": 0.42}

* ``index``: 0-based position of the prompt among the rows of ``--prompts`` (blank lines are not rows;
  the data pipeline's 1-based row numbers in error messages are ``index + 1`` for a file without them);
* ``prompt``: the exact text the model continued, i.e. the chat-formatted (and, if over-long,
  truncated) prompt decoded with its special tokens;
* ``response``: the sampled text with special tokens (the stop token) removed;
* ``response_tokens``: how many tokens were generated, counting the stop token;
* ``finished``: whether a stop token was emitted (False: cut off by ``--max_new_tokens``);
* ``score``: with ``--reward_model``, its score of prompt + response (stop token included).

Design choices:

* **Everything that can be wrong is found before the weights load.** Options are checked first and
  errors name the flag (``--top_p: must be in (0, 1] ...``); then the checkpoint's architecture is read from its
  config alone; then the prompts go through the data pipeline (``kind="prompt"``), so a malformed row
  fails naming file, row and field; the prompt and generation lengths are checked against the
  models' ``max_position_embeddings``. Only then are weights read.
* **One tokenisation path.** Prompts are read, validated, chat-formatted and truncated by
  ``easyppo.data.pipeline``, exactly as PPO rollouts see them; over-long prompts follow
  ``--truncation`` (the pipeline's policy: ``truncate`` keeps BOS and the end of the prompt, ``drop``
  leaves the row out, ``error`` fails).
* **Tokenizer and chat format follow the checkpoint.** Without ``--tokenizer``, the checkpoint
  directory's own tokenizer files are used (the train loop's Hugging Face export writes them), else a
  train run directory's saved ``data.tokenizer_path`` (with its special-id settings); without
  ``--chat_format``, a run's ``data.chat_format``, else ``tulu``. Generation stops at the chat
  format's end-of-turn token (Llama 3's ``<|eot_id|>``) as well as at EOS.
* **One compiled program.** Prompts are left-padded to the longest prompt in the file (after
  truncation), not to ``--max_prompt_len``, and every batch has the same number of rows, so the
  sampler compiles once and no prefill is spent on columns that are padding in every row.
* **Batches fit the mesh.** The default mesh spans every device (pure FSDP, as in training). A
  batch holds ``--batch_size`` prompts rounded up so that prompts x ``--num_samples`` rows split
  evenly over the mesh's batch axes (and the hosts); the samples of a prompt are adjacent rows. The
  last batch is completed with filler rows (``example_mask = 0``) whose outputs are discarded.
* **Reproducible.** Batch ``b`` samples with ``fold_in(key(--seed), b)``; the same seed, options and
  device count give the same file. A row's sample depends on its place in the batch, so changing
  ``--batch_size`` or the device count changes the samples (not their distribution).
* **Never a truncated output.** Rows go to a temporary file in the output's directory, renamed over
  ``--output`` only after the last row, so a failed or interrupted run leaves an existing output
  untouched and no partial file behind.
* **Multi-host ready.** Every process runs the same command; each feeds its share of every batch,
  results are gathered, and process 0 alone writes the file.
* Inference keeps no float32 master copy: ``--dtype`` is both the compute and the parameter dtype.
* The progress bar (over prompts, on stderr) is shown only when stderr is a terminal, and never with
  ``--no_progress``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from easyppo.core import sharding
from easyppo.data import chat, pipeline
from easyppo.data.chat import FORMAT_NAMES, ChatFormat
from easyppo.data.errors import BadRowsError, DataConfigError
from easyppo.data.examples import TRUNCATION_MODES
from easyppo.data.tokenizer import SENTENCEPIECE_MODEL, TOKENIZER_JSON, Tokenizer
from easyppo.models import generation, llama, partitioning, sequences
from easyppo.weights import loading, run_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_CHAT_FORMAT = "tulu"
DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------ options


class OptionError(ValueError):
    """A bad option; the message starts with the flag (``--top_p: ...``)."""

    def __init__(self, flag: str, detail: str) -> None:
        self.flag = flag
        self.detail = detail
        super().__init__(f"--{flag}: {detail}")


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Everything one generation run needs; the CLI flags have the same names.

    Attributes:
      checkpoint: the policy: a Hugging Face directory, an easyppo model checkpoint or a train run's
        checkpoint directory (anything ``easyppo.weights.loading.load_model`` accepts).
      prompts: prompt rows (``messages`` ending in a user turn, or a ``prompt`` string) in .jsonl /
        .json / .parquet files or globs, comma-separated.
      output: the JSONL file to write (replaced atomically at the end).
      tokenizer: tokenizer file or directory; "" follows the checkpoint (module docstring).
      chat_format: "tulu", "llama3", "tokenizer" or "plain"; "" follows the checkpoint.
      pad_id: pad token (an id, or a token string); None takes the tokenizer's (or the run's).
      reward_model: a reward model to score every completion with ("" for none). It must share the
        policy's tokenizer.
      max_new_tokens, temperature, top_p, top_k, greedy: sampling (``generation.SamplingConfig``).
      num_samples: completions per prompt.
      batch_size: prompts per generation call (rounded up to fit the mesh; module docstring).
      max_prompt_len: prompt budget in tokens; longer prompts follow ``truncation``.
      truncation: "truncate", "drop" or "error" (the data pipeline's over-length policy).
      seed: sampling seed.
      dtype: compute and parameter dtype of the models.
      progress: show a progress bar (only when stderr is a terminal).
      cache_dir: where the data pipeline caches tokenised prompts.
      num_proc: processes for tokenising the prompts.
    """

    checkpoint: str
    prompts: str
    output: str
    tokenizer: str = ""
    chat_format: str = ""
    pad_id: int | str | None = None
    reward_model: str = ""
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    num_samples: int = 1
    batch_size: int = 8
    max_prompt_len: int = 512
    truncation: str = "truncate"
    seed: int = 0
    dtype: str = "float32"
    progress: bool = True
    cache_dir: str = dataclasses.field(default_factory=lambda: pipeline.default_config().cache_dir)
    num_proc: int = dataclasses.field(default_factory=lambda: pipeline.default_config().num_proc)


def check_options(options: GenerateOptions) -> None:
    """Checks every option that needs no file; raises :class:`OptionError` naming the flag."""
    for flag in ("checkpoint", "prompts", "output"):
        if not getattr(options, flag):
            raise OptionError(flag, "is required")
    for flag in ("max_new_tokens", "num_samples", "batch_size", "max_prompt_len", "num_proc"):
        if getattr(options, flag) < 1:
            raise OptionError(flag, f"must be at least 1, got {getattr(options, flag)}")
    if not options.greedy and not options.temperature > 0:
        raise OptionError("temperature", f"must be > 0, got {options.temperature} (use --greedy for argmax decoding)")
    if not 0.0 < options.top_p <= 1.0:
        raise OptionError("top_p", f"must be in (0, 1] (1 disables it), got {options.top_p}")
    if options.top_k < 0:
        raise OptionError("top_k", f"must be >= 0 (0 disables it), got {options.top_k}")
    if options.chat_format and options.chat_format not in FORMAT_NAMES:
        raise OptionError("chat_format", f"must be one of {', '.join(FORMAT_NAMES)}, got {options.chat_format!r}")
    if options.truncation not in TRUNCATION_MODES:
        raise OptionError("truncation", f"must be one of {', '.join(TRUNCATION_MODES)}, got {options.truncation!r}")
    if options.dtype not in DTYPES:
        raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if os.path.isdir(options.output):
        raise OptionError("output", f"{options.output} is a directory; name the JSONL file to write")
    output = os.path.abspath(options.output)
    if any(os.path.abspath(part.strip()) == output for part in options.prompts.split(",")):
        raise OptionError("output", f"{options.output} is also the prompts file; it would be overwritten")


def sampling_config(
    options: GenerateOptions, tokenizer: Tokenizer, chat_format: ChatFormat, model_config: llama.LlamaConfig
) -> generation.SamplingConfig:
    """The sampler's settings: stop at the model's EOS, the tokenizer's EOS and the end-of-turn token.

    Greedy decoding ignores temperature, top-k and top-p; they are reset to their defaults so that
    ``generate`` (which compiles per sampling config) does not recompile for values it never reads.
    """
    return generation.SamplingConfig(
        max_new_tokens=options.max_new_tokens,
        greedy=options.greedy,
        temperature=1.0 if options.greedy else options.temperature,
        top_k=0 if options.greedy else options.top_k,
        top_p=1.0 if options.greedy else options.top_p,
        stop_at_eos=model_config.eos_token_id is not None,
        stop_token_ids=chat.stop_token_ids(chat_format, tokenizer),
        pad_token_id=tokenizer.pad_id,
    )


def prompts_per_batch(batch_size: int, num_samples: int, batch_ways: int, process_count: int = 1) -> int:
    """``batch_size`` rounded up so that prompts x samples split over ``batch_ways`` and the hosts.

    Rows are ``prompts * num_samples``; they must be a multiple of ``batch_ways`` (the mesh's
    ``data * fsdp``), and the prompts a multiple of ``process_count`` (each host feeds as many).
    """
    step = math.lcm(batch_ways // math.gcd(batch_ways, num_samples), process_count)
    return -(-batch_size // step) * step


# ------------------------------------------------------------------------- where things come from


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
    if run_checkpoint.is_run_directory(options.checkpoint):
        run_data = run_checkpoint.read_run_config(options.checkpoint).get("data", {})
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
        data = pipeline.prepare_data(data_cfg, tokenizer=tokenizer, chat_format=chat_format)
    except DataConfigError as e:
        raise _as_option_error(e) from e
    except BadRowsError as e:  # the pipeline's headline suggests data.* settings this CLI has no flags for
        raise BadRowsError(e.errors, e.num_rows, headline=_bad_prompts_headline(e, options)) from e
    logger.info("tokenizer %s (from %s), chat format %s", source.path, source.origin, source.chat_format)
    logger.info("prompts %s: %s; %d prompts per batch", options.prompts, data.stats, per_batch)

    width = longest_prompt(data)
    _check_model("checkpoint", policy_architecture, tokenizer, width, options.max_new_tokens, mesh)
    if reward_architecture is not None:
        _check_model("reward_model", reward_architecture, tokenizer, width, options.max_new_tokens, mesh)
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


# ----------------------------------------------------------------------------------- generation


Scorer = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _reward_scorer(plan: Plan, rng: jax.Array) -> Scorer | None:
    """Loads the reward model: ``score(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]``."""
    if plan.reward_config is None:
        return None
    _, module, params = loading.load_model(plan.reward_config, "reward", mesh=plan.mesh, rng=rng)

    @jax.jit
    def score(params, prompt_ids, prompt_mask, response_ids, response_mask):
        joined = sequences.join_prompt_and_response(prompt_ids, prompt_mask, response_ids, response_mask)
        return sequences.reward_scores(module, params, joined)

    return functools.partial(score, params)


def generate_batches(plan: Plan, rng: jax.Array) -> Iterator[dict[str, np.ndarray]]:
    """Loads the models and yields every batch's prompts, completions (and scores) as global NumPy rows.

    Each yielded dict holds ``[rows, ...]`` arrays for the *global* batch on every process:
    ``prompt_ids`` / ``prompt_mask`` (left-padded), ``tokens`` / ``response_mask`` / ``finished``
    (``generation.GenerationOutput``), ``example_index`` / ``example_mask`` (the data pipeline's) and,
    with a reward model, ``score``. The samples of a prompt are adjacent rows.
    """
    # load_rng would only seed a freshly initialised head, which _resolve_model rules out.
    load_rng, sample_rng = jax.random.split(rng)
    model_config, _, params = loading.load_model(plan.policy_config, "causal_lm", mesh=plan.mesh, rng=load_rng)
    score = _reward_scorer(plan, load_rng)
    samples, width = plan.options.num_samples, plan.prompt_width
    for batch_number, host_batch in enumerate(pipeline.make_iterator(plan.data, plan.data_config)):
        batch = sharding.host_local_to_global(
            {
                "prompt_ids": np.repeat(host_batch["prompt_input_ids"][:, -width:], samples, axis=0),
                "prompt_mask": np.repeat(host_batch["prompt_attention_mask"][:, -width:], samples, axis=0),
                "example_index": np.repeat(host_batch["example_index"], samples, axis=0),
                "example_mask": np.repeat(host_batch["example_mask"], samples, axis=0),
            },
            plan.mesh,
        )
        with jax.set_mesh(plan.mesh):
            out = generation.generate(
                params,
                batch["prompt_ids"],
                batch["prompt_mask"],
                jax.random.fold_in(sample_rng, batch_number),
                model_config=model_config,
                sampling=plan.sampling,
            )
            batch.update(tokens=out.tokens, response_mask=out.response_mask, finished=out.finished)
            if score is not None:
                batch["score"] = score(batch["prompt_ids"], batch["prompt_mask"], out.tokens, out.response_mask)
        yield multihost_utils.process_allgather(batch, tiled=True)


def output_rows(batch: Mapping[str, np.ndarray], plan: Plan) -> list[dict[str, Any]]:
    """The JSONL rows of one batch from :func:`generate_batches` (filler rows left out)."""
    tokenizer, num_samples = plan.tokenizer, plan.options.num_samples
    rows = []
    for r in np.flatnonzero(batch["example_mask"]):
        prompt_ids = batch["prompt_ids"][r][batch["prompt_mask"][r].astype(bool)]
        response_ids = batch["tokens"][r][batch["response_mask"][r].astype(bool)]
        row = {
            "index": int(plan.data.batcher.rows[batch["example_index"][r]]),
            "sample": int(r % num_samples),
            "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=False),
            "response": plan.chat_format.decode_response(response_ids, skip_special_tokens=True),
            "response_tokens": len(response_ids),
            "finished": bool(batch["finished"][r]),
        }
        if "score" in batch:
            row["score"] = float(batch["score"][r])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- output


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[IO[str]]:
    """A text file that appears at ``path`` only when the ``with`` block completes.

    It is written in ``path``'s directory (so the final rename never crosses file systems) and
    removed if the block raises, leaving whatever was at ``path`` before untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


@dataclasses.dataclass(frozen=True)
class GenerateSummary:
    """What :func:`generate_file` wrote."""

    output: str
    prompts: int  # prompts completed (after any dropped over-long rows)
    rows: int  # lines written: prompts x num_samples
    finished_fraction: float  # of the rows, those that emitted a stop token
    mean_response_tokens: float
    mean_score: float | None  # with a reward model
    prompts_per_batch: int
    data_stats: dict[str, Any]


def generate_file(options: GenerateOptions) -> GenerateSummary:
    """Samples ``options.num_samples`` completions per prompt and writes them as JSONL (module docstring).

    Every process of a multi-host job calls this with the same options; process 0 writes the file.

    Raises:
      OptionError: a bad option, or a missing / unsuitable checkpoint or tokenizer (names the flag).
      BadRowsError / RowError: malformed or unreadable prompts (names the file, row and field),
        raised before any weights load.
    """
    plan = plan_run(options)
    writer = jax.process_index() == 0
    rows = finished = response_tokens = 0
    score = 0.0
    bar = tqdm.tqdm(
        total=len(plan.data.batcher),
        unit="prompt",
        dynamic_ncols=True,
        disable=True if not (options.progress and writer) else None,
    )  # None: only on a terminal
    with bar, atomic_output(options.output) if writer else contextlib.nullcontext() as f:
        for batch in generate_batches(plan, jax.random.key(options.seed)):
            batch_rows = output_rows(batch, plan)
            if f is not None:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in batch_rows)
            rows += len(batch_rows)
            finished += sum(row["finished"] for row in batch_rows)
            response_tokens += sum(row["response_tokens"] for row in batch_rows)
            score += sum(row.get("score", 0.0) for row in batch_rows)
            bar.update(len(batch_rows) // options.num_samples)

    return GenerateSummary(
        output=options.output,
        prompts=len(plan.data.batcher),
        rows=rows,
        finished_fraction=finished / max(rows, 1),
        mean_response_tokens=response_tokens / max(rows, 1),
        mean_score=score / max(rows, 1) if options.reward_model else None,
        prompts_per_batch=plan.data_config.global_batch_size,
        data_stats=plan.data.stats.as_dict(),
    )
