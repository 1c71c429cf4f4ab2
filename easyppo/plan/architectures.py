"""The architectures of the hub checkpoints a run names, found without downloading any weights.

Planning needs a model's shapes, never its weights, but a run's ``init_from`` (and a reference's
``reference_init_from``) normally names a Hugging Face hub checkpoint, which training would download
whole. The planner asks the hub for its ``config.json`` alone (a few kilobytes). Where the hub cannot
be reached (an air-gapped machine, ``HF_HUB_OFFLINE=1``), the checkpoints this project's presets name
are known here: their published ``config.json`` matches a model preset of ``easyppo.models``. Either
way the source is replaced by a local directory holding just that ``config.json``, which the loaders
read as they would the checkpoint's (``model.init_from`` of a directory), so the rest of the run's
config (dtype, remat, scan) applies unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import socket
import urllib.parse
from typing import Any

import ml_collections

from easyppo.models import llama
from easyppo.run.config import ConfigError
from easyppo.weights import hub

logger = logging.getLogger(__name__)

# The checkpoints the pod presets name, and the model preset their config.json matches.
KNOWN_CHECKPOINTS: dict[str, str] = {
    "meta-llama/Llama-2-7b-hf": "llama2_7b",
    "meta-llama/Llama-2-13b-hf": "llama2_13b",
    "meta-llama/Llama-2-70b-hf": "llama2_70b",
    "meta-llama/Meta-Llama-3-8B": "llama3_8b",
    "meta-llama/Meta-Llama-3-70B": "llama3_70b",
    "meta-llama/Llama-3.1-8B": "llama3.1_8b",
    "meta-llama/Llama-3.1-70B": "llama3.1_70b",
    "allenai/tulu-2-7b": "tulu2_7b",
    "allenai/tulu-2-13b": "tulu2_13b",
    "allenai/tulu-2-70b": "tulu2_70b",
    "allenai/tulu-v2.5-13b-uf-rm": "tulu2_13b",
    "allenai/tulu-v2.5-70b-preference-mix-rm": "tulu2_70b",
    "allenai/Llama-3.1-Tulu-3-8B-SFT": "llama3.1_8b",
    "allenai/Llama-3.1-Tulu-3-8B-DPO": "llama3.1_8b",
    "allenai/Llama-3.1-Tulu-3-8B": "llama3.1_8b",
    "allenai/Llama-3.1-Tulu-3-8B-RM": "llama3.1_8b",
    "allenai/Llama-3.1-Tulu-3-70B-SFT": "llama3.1_70b",
    "allenai/Llama-3.1-Tulu-3-70B-DPO": "llama3.1_70b",
}


def _is_source_key(key: str) -> bool:
    return key == "init_from" or key.endswith("_init_from")


def _sources(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, ml_collections.ConfigDict, str]]:
    """``(dotted key, section, field)`` of every weights source in ``config``."""
    found = []
    for key in config:
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            found += _sources(value, f"{prefix}{key}.")
        elif _is_source_key(key) and isinstance(value, str):
            found.append((f"{prefix}{key}", config, key))
    return found


@functools.cache
def _hub_unreachable() -> str:
    """Why the hub cannot be asked ("" if it can): offline mode, or its host does not resolve.

    Checked once up front because the hub client retries a failing request for half a minute.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} does not resolve: {e}"
    return ""


def _hub_config(source: str, key: str) -> dict[str, Any]:
    """The ``config.json`` of the hub checkpoint ``source``: from the hub, else from the known table."""
    repo_id, _, revision = source.partition("@")
    reason = _hub_unreachable()
    if not reason:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id, "config.json", revision=revision or None)
            return json.loads(pathlib.Path(path).read_text())
        except Exception as e:  # gated, missing, a network failure: every one falls back the same way
            reason = " ".join(str(e).split())[:160]
    if repo_id in KNOWN_CHECKPOINTS:
        preset = KNOWN_CHECKPOINTS[repo_id]
        logger.info(
            "%s=%s: the hub cannot be asked (%s); its architecture is the %s preset", key, source, reason, preset
        )
        return llama.get_preset(preset).to_hf_dict()
    raise ConfigError(
        key,
        f"{source!r} is a hub name whose config.json could not be read ({reason}) and is not one the planner "
        f"knows; plan with --config.{key}= and a model preset instead",
    )


def without_weights(config: ml_collections.ConfigDict, scratch: pathlib.Path) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose hub-named weight sources are directories holding only their config.json.

    Local paths, run directories and bucket URLs are left as they are: their architecture is read
    from their own metadata, without the weights.
    """
    planned = ml_collections.ConfigDict(config.to_dict())
    for key, section, field in _sources(planned):
        source = section[field]
        if not source or not hub.is_hub_name(source) or os.path.exists(os.path.expanduser(source)):
            continue
        hf_config = _hub_config(source, key)
        directory = scratch / hashlib.sha256(source.encode()).hexdigest()[:16]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(hf_config))
        section[field] = str(directory)
    return planned
