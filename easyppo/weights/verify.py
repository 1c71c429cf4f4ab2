"""Checks a converted model against ``transformers``: the same random tokens through both.

``verify`` loads the Hugging Face directory with ``transformers`` (torch, an optional dependency) and
the easyppo side from a model checkpoint or the same directory, feeds easyppo one left- and
right-padded batch and ``transformers`` each row's real tokens alone, and reports the largest
difference of logits (or scores, or values) against the scale of the outputs.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np

from easyppo.models.llama import make_model
from easyppo.weights import hf_files
from easyppo.weights.hf_mapping import architecture_kind
from easyppo.weights.huggingface import load_hf
from easyppo.weights.model_checkpoint import load_checkpoint


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """How far easyppo's outputs are from ``transformers``' on the same random tokens."""

    kind: str
    dtype: str
    output_name: str  # "logits", "scores" or "values"
    max_abs_diff: float
    max_abs_reference: float  # the largest |output| of transformers, for scale
    num_sequences: int
    min_length: int
    max_length: int

    def summary(self) -> str:
        return (
            f"verify {self.kind} ({self.dtype}): {self.num_sequences} sequences of "
            f"{self.min_length}-{self.max_length} random tokens, left- and right-padded\n"
            f"max abs difference of {self.output_name} (easyppo vs transformers): {self.max_abs_diff:.3e}"
            f"  (largest |{self.output_name}| {self.max_abs_reference:.3g})"
        )


def random_padded_batch(
    vocab_size: int, batch_size: int, seq_len: int, *, pad_token_id: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens (never the pad id) of random lengths in [seq_len/2, seq_len]: the first row full,
    odd rows left-padded, even rows right-padded. Returns ``(input_ids, attention_mask)``, int32."""
    rng = np.random.default_rng(seed)
    pad = 0 if pad_token_id is None else pad_token_id
    ids = np.full((batch_size, seq_len), pad, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        length = seq_len if row == 0 else int(rng.integers(max(1, seq_len // 2), seq_len + 1))
        if pad_token_id is None:
            tokens = rng.integers(0, vocab_size, length)
        else:
            tokens = rng.integers(0, vocab_size - 1, length)
            tokens = np.where(tokens >= pad_token_id, tokens + 1, tokens)  # every id but the pad id
        span = slice(seq_len - length, seq_len) if row % 2 else slice(0, length)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask


def require_transformers() -> None:
    """Raises a one-line ``ImportError`` saying what to install when torch or transformers is missing;
    called before anything is converted, so a ``--verify`` cannot fail after the work is done."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"checking against transformers needs {' and '.join(missing)}: pip install 'easyppo[verify]' "
            "(a CPU build of torch is enough)"
        )


def _transformers_outputs(hf_dir: str, kind: str, dtype: str, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Per row, transformers' output on that row's tokens alone (no padding), in float32 NumPy."""
    import torch
    import transformers

    if kind == "causal_lm":
        model_class = transformers.LlamaForCausalLM
    else:
        model_class = transformers.LlamaForSequenceClassification
    model = model_class.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    outputs = []
    with torch.no_grad():
        for row_ids, row_mask in zip(ids, mask):
            tokens = torch.from_numpy(row_ids[row_mask.astype(bool)].astype(np.int64))[None]
            if kind == "causal_lm":
                out = model(input_ids=tokens).logits[0]
            elif kind == "reward":
                out = model(input_ids=tokens).logits[0, 0]
            else:
                out = model.score(model.model(input_ids=tokens).last_hidden_state)[0, :, 0]
            outputs.append(out.float().numpy())
    return outputs


def verify(
    hf_dir: str,
    *,
    checkpoint_dir: str | None = None,
    kind: str | None = None,
    dtype: str = "float32",
    batch_size: int = 4,
    seq_len: int = 16,
    seed: int = 0,
) -> VerifyResult:
    """Compares easyppo's outputs with ``transformers``' for the model in ``hf_dir``.

    The easyppo side is ``checkpoint_dir`` (an easyppo model checkpoint) when given, else ``hf_dir``
    loaded with ``load_hf``. Both run in ``dtype`` (float32 by default, so the number measures the
    conversion rather than rounding). easyppo sees one left/right-padded batch; ``transformers`` sees
    each row's real tokens alone, so padding and position handling are checked too.
    """
    require_transformers()
    if checkpoint_dir is not None:
        config, stored_kind, params = load_checkpoint(checkpoint_dir, param_dtype=dtype)
        kind = kind or stored_kind
        if (kind == "causal_lm") != (stored_kind == "causal_lm"):
            raise ValueError(f"{checkpoint_dir} holds a {stored_kind} model, which cannot be verified as {kind}")
        config = config.replace(dtype=dtype)
        module = make_model(config, kind)
    else:
        kind = kind or architecture_kind(hf_files.read_config(hf_dir), hf_dir) or "causal_lm"
        config, module, params = load_hf(hf_dir, kind, param_dtype=dtype, dtype=dtype)
    ids, mask = random_padded_batch(config.vocab_size, batch_size, seq_len, pad_token_id=config.pad_token_id, seed=seed)
    ours = np.asarray(module.apply({"params": params}, ids, attention_mask=mask), np.float32)
    theirs = _transformers_outputs(hf_dir, kind, dtype, ids, mask)
    diffs, scale = [], []
    for row, reference in enumerate(theirs):
        mine = ours[row] if kind == "reward" else ours[row][mask[row].astype(bool)]
        diffs.append(np.max(np.abs(mine - reference)))
        scale.append(np.max(np.abs(reference)))
    lengths = mask.sum(axis=1)
    return VerifyResult(
        kind=kind,
        dtype=dtype,
        output_name={"causal_lm": "logits", "reward": "scores", "value": "values"}[kind],
        max_abs_diff=float(max(diffs)),
        max_abs_reference=float(max(scale)),
        num_sequences=batch_size,
        min_length=int(lengths.min()),
        max_length=int(lengths.max()),
    )
