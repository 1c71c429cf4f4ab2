"""Writes a run's tokenizer next to an exported Hugging Face model, so the export is self-contained."""

from __future__ import annotations

import json

from etils import epath

from easyppo.weights import hf_files


def save_tokenizer_files(tokenizer_path: str, tokenizer, directory: str, chat_format=None) -> list[str]:
    """Copies the tokenizer at ``tokenizer_path`` into ``directory`` in Hugging Face's layout.

    A tokenizer directory is copied file by file; a lone sentencepiece ``.model`` or
    ``tokenizer.json`` is copied under its canonical name with a ``tokenizer_config.json`` naming the
    special tokens the run used (``transformers.AutoTokenizer`` then loads the export as is).
    With ``chat_format`` (the run's), its Jinja chat template goes into ``tokenizer_config.json`` and
    a ``generation_config.json`` lists every id that ends an assistant turn, so that
    ``apply_chat_template`` and ``generate`` in transformers use the model as it was trained.
    Returns the names written.
    """
    source = epath.Path(tokenizer_path)
    out = epath.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        written = hf_files.copy_companion_files(str(source), str(out))
    else:
        written = _save_single_file(source, tokenizer, out)
    if chat_format is not None:
        written += _write_chat_files(chat_format, tokenizer, out)
    return list(dict.fromkeys(written))


def _save_single_file(source: epath.Path, tokenizer, out: epath.Path) -> list[str]:
    if source.suffix == ".model":
        name, tokenizer_class = "tokenizer.model", "LlamaTokenizer"
    elif source.name.endswith(".json"):
        name, tokenizer_class = "tokenizer.json", "PreTrainedTokenizerFast"
    else:
        raise ValueError(f"cannot export tokenizer {source!s}: expected a directory, .model or tokenizer.json")
    (out / name).write_bytes(source.read_bytes())
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": tokenizer.id_to_token(tokenizer.bos_id),
        "eos_token": tokenizer.id_to_token(tokenizer.eos_id),
        "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
        "add_bos_token": True,
        "add_eos_token": False,
    }
    if name == "tokenizer.model":
        # Text after a special token starts a new sentencepiece string, as easyppo (and Tulu 2's
        # training) tokenise it: transformers' "legacy" Llama behaviour.
        config["legacy"] = True
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [name, "tokenizer_config.json"]


def _write_chat_files(chat_format, tokenizer, out: epath.Path) -> list[str]:
    from easyppo.data.chat import stop_token_ids

    written = []
    template = chat_format.hf_chat_template
    config_path = out / "tokenizer_config.json"
    if template and config_path.exists():
        config = json.loads(config_path.read_text())
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        for stale in ("chat_template.jinja", "chat_template.json"):  # would override tokenizer_config's
            if (out / stale).exists():
                (out / stale).unlink()
        written.append("tokenizer_config.json")
    generation_path = out / "generation_config.json"
    generation = (
        json.loads(generation_path.read_text()) if generation_path.exists() else {}
    )  # keep its sampling defaults
    generation.update(
        bos_token_id=tokenizer.bos_id,
        eos_token_id=list(stop_token_ids(chat_format, tokenizer)),
        pad_token_id=tokenizer.pad_id,
    )
    generation_path.write_text(json.dumps(generation, indent=2) + "\n")
    return written + ["generation_config.json"]
