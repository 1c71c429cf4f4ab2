"""The options of ``easyppo generate`` (one field per flag), checked before anything is read.

``GenerateOptions`` is what ``generate_file`` takes; ``check_options`` fails naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
import os

from easyppo.data import chat, pipeline
from easyppo.data.chat import FORMAT_NAMES, ChatFormat
from easyppo.data.examples import TRUNCATION_MODES
from easyppo.data.tokenizer import Tokenizer
from easyppo.models import generation, llama

DEFAULT_CHAT_FORMAT = "tulu"
DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------ options


class OptionError(ValueError):
    """A bad option; the message starts with the flag (``--top_p: ...``)."""

    def __init__(self, flag: str, detail: str) -> None:
        self.flag = flag
        self.detail = detail
        super().__init__(f"--{flag}: {detail}")


DEFAULT_MAX_NEW_TOKENS = 128  # when --max_new_tokens is not given (and the model has the positions)


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
      max_new_tokens: tokens to sample per completion; None: ``DEFAULT_MAX_NEW_TOKENS``, or fewer when
        the longest prompt leaves the model fewer positions.
      temperature, top_p, top_k, greedy: sampling (``generation.SamplingConfig``).
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
    max_new_tokens: int | None = None
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
        if getattr(options, flag) is not None and getattr(options, flag) < 1:
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
