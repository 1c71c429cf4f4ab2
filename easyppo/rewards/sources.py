"""A run's reward sources: parsing ``"name[=weight],..."`` and scoring decoded responses with them.

    parse_reward_spec("math_verify,format=0.1")  ->  {"math_verify": 1.0, "format": 0.1}
    sources = RewardSources.from_spec(spec, format_pattern=..., numeric_tolerance=...)
    total, per_source = sources.score(responses, answers, prompts)   # host side, NumPy

``reward_model`` names the run's reward model: it is scored on the device by the trainer, so it is
weighted here but never called; ``per_source`` holds the host sources only.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Sequence

import numpy as np

from easyppo.core.options import OptionError
from easyppo.rewards import functions

REWARD_MODEL = "reward_model"


def parse_reward_spec(spec: str, *, key: str = "rewards") -> dict[str, float]:
    """``"a,b=0.5"`` -> ``{"a": 1.0, "b": 0.5}`` (order kept). Raises ``OptionError(key, ...)`` naming
    the bad entry: an unknown name, a weight that is not a finite number, or a repeated source."""
    out: dict[str, float] = {}
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        name, _, weight_text = entry.partition("=")
        name = name.strip()
        if name != REWARD_MODEL and name not in functions.BUILTIN and ":" not in name:
            raise OptionError(
                key,
                f"unknown reward source {name!r}; use one of {(REWARD_MODEL, *functions.BUILTIN)} or 'module:function'",
            )
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise OptionError(key, f"the weight of {name!r} is not a number: {weight_text.strip()!r}") from None
        if not math.isfinite(weight):
            raise OptionError(key, f"the weight of {name!r} must be finite, got {weight}")
        if name in out:
            raise OptionError(key, f"reward source {name!r} is named twice")
        out[name] = weight
    return out


def load_function(name: str, *, format_pattern: str, numeric_tolerance: float, key: str = "rewards"):
    """The batched function behind a host source name (a built-in or ``module:function``)."""
    if name == "numeric":
        return functions.numeric(numeric_tolerance)
    if name == "format":
        if not format_pattern:
            raise OptionError(key, "the 'format' reward needs reward_format_pattern (a regular expression)")
        try:
            return functions.format_match(format_pattern)
        except Exception as e:  # re.error
            raise OptionError(key, f"reward_format_pattern is not a valid regular expression: {e}") from None
    if name in functions.BUILTIN:
        return getattr(functions, name)
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise OptionError(key, f"cannot import the reward function's module {module_name!r}: {e}") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise OptionError(key, f"{module_name!r} has no function {attribute!r}")
    return fn


@dataclasses.dataclass(frozen=True)
class RewardSources:
    """Weighted reward sources; ``score`` evaluates the host ones on decoded text."""

    host: tuple[tuple[str, float, functions.RewardFn], ...]
    reward_model_weight: float  # 0 when the reward model is not a source

    @classmethod
    def from_spec(
        cls, spec: str, *, format_pattern: str = "", numeric_tolerance: float = 1e-6, key: str = "rewards"
    ) -> RewardSources:
        weights = parse_reward_spec(spec, key=key)
        host = tuple(
            (
                name,
                weight,
                load_function(name, format_pattern=format_pattern, numeric_tolerance=numeric_tolerance, key=key),
            )
            for name, weight in weights.items()
            if name != REWARD_MODEL
        )
        return cls(host=host, reward_model_weight=weights.get(REWARD_MODEL, 0.0))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.host)

    @property
    def needs_answers(self) -> bool:
        return any(functions.NEEDS_ANSWER.get(name, False) for name in self.names)

    def score(
        self, responses: list[str], answers: Sequence[str | None], prompts: list[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The weighted sum of the host sources [R] (float32) and each source's unweighted values."""
        total = np.zeros(len(responses), np.float32)
        per_source = {}
        for name, weight, fn in self.host:
            values = np.asarray(fn(list(responses), list(answers), list(prompts)), dtype=np.float64)
            if values.shape != (len(responses),):
                raise ValueError(
                    f"reward source {name!r} returned {values.shape[0] if values.ndim else 'a scalar'} values for {len(responses)} responses"
                )
            if not np.all(np.isfinite(values)):
                bad = int(np.flatnonzero(~np.isfinite(values))[0])
                raise ValueError(
                    f"reward source {name!r} returned {values[bad]} for response {bad}: rewards must be finite"
                )
            per_source[name] = values.astype(np.float32)
            total += np.float32(weight) * per_source[name]
        return total, per_source
