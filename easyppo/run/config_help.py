"""Every key of a run config with its value and a one-line description (``easyppo train --list_keys``).

The descriptions live where the defaults do, and are read from there rather than repeated:

* option dataclasses (``config.ppo``, ``config.dpo`` ..., ``easyppo.core.options.option``): each
  field's ``help``;
* ConfigDict sections built by a ``default_config()`` function: the comment at the end of the line
  that sets the key (``c.max_seq_len = 1024  # Padded width ...``), or a ``key: text`` line of the
  function's (or the dataclass's) docstring.

A key with neither is listed with its value alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from easyppo.algorithms import get_algorithm
from easyppo.core import optim, sharding
from easyppo.data import pipeline
from easyppo.run import config as run_config
from easyppo.run import metrics as metrics_lib
from easyppo.weights import loading, run_checkpoint

# Section -> the functions that build it (their inline comments and docstrings describe its keys).
SECTION_BUILDERS: dict[str, tuple[Callable[..., Any], ...]] = {
    "": (run_config.base_config,),
    "train": (run_config.train_defaults,),
    "eval": (run_config.eval_defaults,),
    "model": (loading.default_config,),
    "model.lora": (loading.lora_default_config,),
    "mesh": (sharding.default_config,),
    "data": (pipeline.default_config,),
    "optim": (optim.default_config,),
    "checkpoint": (run_checkpoint.default_config,),
    "logging": (metrics_lib.default_config,),
}
_DOC_LINE = re.compile(r"^\s{2,}([A-Za-z_][\w.]*(?:, [A-Za-z_][\w.]*)*):\s+(\S.*)$")


def inline_comments(function: Callable[..., Any]) -> dict[str, str]:
    """``{key: comment}`` for each ``<name>.key = value  # comment`` line in ``function``'s source."""
    found: dict[str, str] = {}
    source = inspect.getsource(function)
    line_tokens: list[tokenize.TokenInfo] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NEWLINE, tokenize.NL):
            key, comment = _assignment_comment(line_tokens)
            if key and comment:
                found[key] = comment
            line_tokens = []
        else:
            line_tokens.append(token)
    return found


def _assignment_comment(tokens: list[tokenize.TokenInfo]) -> tuple[str, str]:
    """(dotted key after the receiver name, comment) of one ``c.a.b = ...  # text`` line, else ("", "")."""
    comments = [t.string for t in tokens if t.type == tokenize.COMMENT]
    code = [t for t in tokens if t.type not in (tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
    if not comments or len(code) < 4 or code[0].type != tokenize.NAME or code[1].string != ".":
        return "", ""
    names = []
    for token in code[1:]:
        if token.string == "=":
            break
        if token.type == tokenize.NAME:
            names.append(token.string)
        elif token.string != ".":
            return "", ""
    else:
        return "", ""
    return ".".join(names), comments[-1].lstrip("#").strip()


def docstring_entries(obj: Any) -> dict[str, str]:
    """``{key: first line}`` of indented ``key: text`` (or ``a, b: text``) lines in ``obj``'s docstring."""
    found: dict[str, str] = {}
    for line in (inspect.getdoc(obj) or "").splitlines():
        match = _DOC_LINE.match("  " + line if not line.startswith(" ") else line)
        if match:
            for key in match.group(1).split(", "):
                found.setdefault(key, match.group(2).strip())
    return found


def option_help(options_type: type) -> dict[str, str]:
    """``{field: help}`` of an option dataclass, nested option dataclasses as ``field.subfield``."""
    found: dict[str, str] = {}
    docs = docstring_entries(options_type)
    for field in dataclasses.fields(options_type):
        found[field.name] = field.metadata.get("help") or docs.get(field.name, "")
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            found.update({f"{field.name}.{k}": v for k, v in option_help(type(default)).items()})
    return found


def descriptions(algorithm: str) -> dict[str, str]:
    """``{dotted key: description}`` for every documented key of a run of ``algorithm``."""
    found: dict[str, str] = {}
    for section, builders in SECTION_BUILDERS.items():
        prefix = f"{section}." if section else ""
        for builder in builders:
            for key, text in {**docstring_entries(builder), **inline_comments(builder)}.items():
                found.setdefault(prefix + key, text)
    entry = get_algorithm(algorithm)
    found.update({f"{entry.name}.{k}": v for k, v in option_help(entry.options_type).items()})
    return {key: text for key, text in found.items() if text}


def describe(key: str, helps: dict[str, str]) -> str:
    """The description of ``key``; a key nested in an algorithm's section that embeds a shared section
    (``ppo.value_optim.learning_rate`` is an ``optim`` key) borrows the description of the same key
    elsewhere, when the key's trailing parts name exactly one described key."""
    if key in helps:
        return helps[key]
    parts = key.split(".")
    for embedded in ("model", "optim"):  # ppo.reward_model.*, ppo.value_optim.*: model / optim sections
        if len(parts) >= 3 and parts[-2].endswith(f"_{embedded}") and f"{embedded}.{parts[-1]}" in helps:
            return helps[f"{embedded}.{parts[-1]}"]
    for start in range(1, len(parts)):
        tail = "." + ".".join(parts[start:])
        matches = {text for other, text in helps.items() if other.endswith(tail)}
        if len(matches) == 1:
            return matches.pop()
    return ""


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of ``config``, in the config's own order."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def list_keys(config: ml_collections.ConfigDict) -> str:
    """One line per key: ``key = value`` and, where documented, ``# description``."""
    helps = descriptions(config.algorithm)
    rows = [(key, repr(value), describe(key, helps)) for key, value in flat_items(config)]
    width = min(max(len(key) + len(value) + 3 for key, value, _ in rows), 64)
    lines = []
    for key, value, text in rows:
        assignment = f"{key} = {value}"
        lines.append(f"{assignment:<{width}}  # {text}" if text else assignment)
    return "\n".join(lines)
