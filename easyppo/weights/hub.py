"""Model sources named on the Hugging Face hub: ``org/name`` or ``org/name@revision``.

Wherever a model or tokenizer path is accepted (``model.init_from``, the reward and value models'
``init_from``, ``data.tokenizer_path``), a source that is neither a local path that exists nor a URL,
but reads as a hub name, is downloaded once into the hub cache (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and used from there. ``@revision`` pins a
branch, tag or commit; a private or gated model takes its token from ``$HF_TOKEN``;
``HF_HUB_OFFLINE=1`` uses the cache only. When the hub cannot provide it (offline, unknown name, no
access) the error is one line naming the config key and the name.
"""

from __future__ import annotations

import os
import re

from easyppo.core import paths

# org/name with the characters the hub allows, optionally @revision.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


def is_hub_name(source: str) -> bool:
    """Whether ``source`` reads as ``org/name[@revision]`` (and so may name a hub repository)."""
    return bool(HUB_NAME.match(source)) and not source.startswith((".", "~"))


def local_source(source: str, *, key: str) -> str:
    """A path to read ``source`` from: a URL as is, an existing local path made absolute, a hub name
    downloaded (module doc); anything else made absolute, for the caller to report as missing.
    ``key`` names the config key in the error ("" when the caller adds it)."""
    if not source or paths.is_remote(source):
        return source
    local = paths.resolve(source)
    if os.path.exists(local) or not is_hub_name(source):
        return local
    repo_id, _, revision = source.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return snapshot_download(repo_id, revision=revision or None)
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300]
        named = f"{key}={source!r}" if key else repr(source)
        raise FileNotFoundError(
            f"{named} is not a local path, and the Hugging Face hub could not provide it: {reason}"
        ) from e


def push_folder(folder: str, repo: str, *, private: bool = False, message: str = "") -> str:
    """Uploads the Hugging Face directory ``folder`` to the hub repository ``repo`` (``org/name`` or
    ``org/name@branch``), creating the repository if needed; returns its URL.

    The token comes from ``$HF_TOKEN`` (or ``hf auth login``). Failures (offline, no access, a bad
    name) are one line naming the repository.
    """
    if not is_hub_name(repo):
        raise ValueError(f"--push_to_hub={repo!r} is not a hub repository name (org/name or org/name@branch)")
    repo_id, _, branch = repo.partition("@")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=branch or None,
            commit_message=message or "Upload model exported by easyppo",
        )
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300]
        raise OSError(f"pushing to the Hugging Face hub repository {repo!r} failed: {reason}") from e
    return str(url)
