"""Options as one frozen dataclass that holds each key, its default, its help and its checks.

Algorithms (``config.ppo``, ``config.dpo`` ...) and the sampler declare their options this way. The
``ConfigDict`` section a run config carries is derived from the dataclass (:func:`to_config`), and read back into it (:func:`from_config`), which runs the
dataclass's own validation. So an option is declared once, and a typo, a bad value or a forgotten
key fails in one place with the key's full name.

    @dataclasses.dataclass(frozen=True)
    class MyOptions:
        beta: float = option(0.1, "inverse temperature of the implicit reward")

        def __post_init__(self):
            require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections
from ml_collections import config_dict

T = TypeVar("T")

# The largest magnitude an option may have when it ends up in float32 arithmetic on the device.
FLOAT32_MAX = 3.4028234663852886e38


class OptionError(ValueError):
    """An invalid option; ``key`` is its dotted name (within its section, or in the whole config)."""

    def __init__(self, key: str, message: str | None = None):
        if message is None:  # rebuilt from its text alone (absl's flag parser does this)
            key, _, message = key.partition(": ")
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def __reduce__(self):
        return type(self), (self.key, self.message)

    def within(self, section: str) -> OptionError:
        """The same error with its key prefixed by the section that holds it."""
        return OptionError(f"{section}.{self.key}" if section else self.key, self.message)


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description (listed by ``easyppo train --help``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults need a default_factory; use a tuple")
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def require(ok: bool, key: str, message: str) -> None:
    """Raises ``OptionError(key, message)`` unless ``ok``."""
    if not ok:
        raise OptionError(key, message)


def require_finite(value: float, key: str) -> None:
    """A float the device computes with must be finite in float32 (1e39 would become inf there)."""
    require(math.isfinite(value) and abs(value) <= FLOAT32_MAX, key, f"must be a finite float32 value, got {value}")


def _field_types(options_type: type) -> dict[str, Any]:
    return typing.get_type_hints(options_type)


def _placeholder_type(annotation: Any) -> type:
    """``float | None`` -> float (the type a ``None`` default's ConfigDict placeholder accepts)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _placeholder_type(args[0])
    return typing.get_origin(annotation) or annotation


def to_config(options: Any) -> ml_collections.ConfigDict:
    """The ConfigDict section of ``options`` (a dataclass instance): every field, nested ones as sections."""
    hints = _field_types(type(options))
    values = {}
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if dataclasses.is_dataclass(value):
            values[field.name] = to_config(value)
        elif value is None:
            values[field.name] = config_dict.placeholder(_placeholder_type(hints[field.name]))
        else:
            values[field.name] = value
    return ml_collections.ConfigDict(values)


def from_config(options_type: type[T], section: ml_collections.ConfigDict | Mapping[str, Any], *, name: str = "") -> T:
    """``options_type`` built from a config section, validated; errors name ``<name>.<key>``."""
    values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
    fields = {field.name: field for field in dataclasses.fields(options_type)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise OptionError(
            f"{name}.{unknown[0]}" if name else unknown[0], f"unknown key; known keys are {sorted(fields)}"
        )
    hints = _field_types(options_type)
    for key, value in values.items():
        nested = hints[key]
        if dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            values[key] = from_config(nested, value, name=f"{name}.{key}" if name else key)
    try:
        return options_type(**values)
    except OptionError as e:
        raise e.within(name) from None
