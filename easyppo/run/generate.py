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
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import jax
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from easyppo.core import paths, sharding
from easyppo.data import pipeline
from easyppo.models import generation, sequences
from easyppo.run.generate_options import GenerateOptions
from easyppo.run.generate_plan import Plan, plan_run
from easyppo.weights import loading

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

    Locally it is written in ``path``'s directory (so the final rename never crosses file systems)
    and removed if the block raises, leaving whatever was at ``path`` before untouched. A remote
    ``path`` (``gs://...``) is written in one upload once the block completes: an object store
    publishes an object whole.
    """
    if paths.is_remote(path):
        buffer = io.StringIO()
        yield buffer
        epath.Path(path).write_text(buffer.getvalue())
        return
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
