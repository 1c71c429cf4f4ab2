"""Writes a run's tokenizer next to an exported Hugging Face model, so the export is self-contained."""

from __future__ import annotations

import json

from etils import epath

from easyppo.weights import hf_files


def save_tokenizer_files(tokenizer_path: str, tokenizer, directory: str) -> list[str]:
    """Copies the tokenizer at ``tokenizer_path`` into ``directory`` in Hugging Face's layout.

    A tokenizer directory is copied file by file; a lone sentencepiece ``.model`` or
    ``tokenizer.json`` is copied under its canonical name with a ``tokenizer_config.json`` naming the
    special tokens the run used (``transformers.AutoTokenizer`` then loads the export as is).
    Returns the names written.
    """
    source = epath.Path(tokenizer_path)
    out = epath.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        return hf_files.copy_companion_files(str(source), str(out))
    if source.suffix == ".model":
        name, tokenizer_class = "tokenizer.model", "LlamaTokenizer"
    elif source.name.endswith(".json"):
        name, tokenizer_class = "tokenizer.json", "PreTrainedTokenizerFast"
    else:
        raise ValueError(f"cannot export tokenizer {tokenizer_path!r}: expected a directory, .model or tokenizer.json")
    (out / name).write_bytes(source.read_bytes())
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": tokenizer.id_to_token(tokenizer.bos_id),
        "eos_token": tokenizer.id_to_token(tokenizer.eos_id),
        "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
        "add_bos_token": True,
        "add_eos_token": False,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [name, "tokenizer_config.json"]
