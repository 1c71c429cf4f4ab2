"""Exports are complete Hugging Face models: transformers' ``apply_chat_template`` on an exported
tokenizer gives easyppo's ids token for token, and ``generation_config.json`` stops where easyppo does."""

import json

import pytest
from helpers.tokenizers import make_tiny_hf_tokenizer_dir, train_tiny_sentencepiece

from easyppo.data.chat import make_chat_format, stop_token_ids
from easyppo.data.export import save_tokenizer_files
from easyppo.data.tokenizer import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": " What is the capital of France? "},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin."},
]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def exported(tmp_path, source, format_name, **tokenizer_options):
    tokenizer = load_tokenizer(str(source), **tokenizer_options)
    chat_format = make_chat_format(format_name, tokenizer)
    save_tokenizer_files(str(source), tokenizer, str(tmp_path / "export"), chat_format)
    return chat_format, tmp_path / "export"


# Tulu and plain over a Llama-2-shaped sentencepiece file (role tags are plain text, as in Tulu 2's
# tokenizer), Llama 3 over a tokenizer directory with its special tokens.
SOURCES = {
    "tulu": lambda tmp: (train_tiny_sentencepiece(tmp, pad_piece=True), {"pad_id": 3}),
    "plain": lambda tmp: (train_tiny_sentencepiece(tmp, pad_piece=True), {"pad_id": 3}),
    "llama3": lambda tmp: (make_tiny_hf_tokenizer_dir(tmp), {}),
}


@pytest.mark.parametrize("format_name", ["tulu", "llama3"])
def test_apply_chat_template_on_the_export_equals_easyppos_ids(tmp_path, transformers, format_name):
    source, options = SOURCES[format_name](tmp_path)
    chat_format, export = exported(tmp_path, source, format_name, **options)
    hf = transformers.AutoTokenizer.from_pretrained(str(export))
    apply = lambda messages, **kw: hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]
    assert apply(CONVERSATION[:-1], add_generation_prompt=True) == chat_format.encode_prompt(CONVERSATION[:-1])
    assert apply(CONVERSATION) == chat_format.encode_conversation(CONVERSATION).ids


def test_the_plain_template_renders_easyppos_text(tmp_path, transformers):
    # Plain contents carry their own spacing, so where a prompt's last word and the response's first
    # touch, one-piece tokenisation may merge them differently; the text itself is the same.
    source, options = SOURCES["plain"](tmp_path)
    chat_format, export = exported(tmp_path, source, "plain", **options)
    hf = transformers.AutoTokenizer.from_pretrained(str(export))
    rendered = hf.apply_chat_template(CONVERSATION, tokenize=False)
    ids = chat_format.encode_conversation(CONVERSATION).ids
    assert rendered == chat_format.tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("format_name", ["tulu", "llama3"])
def test_the_generation_config_stops_at_every_end_of_turn_id(tmp_path, format_name):
    source, options = SOURCES[format_name](tmp_path)
    chat_format, export = exported(tmp_path, source, format_name, **options)
    config = json.loads((export / "generation_config.json").read_text())
    assert config["eos_token_id"] == list(stop_token_ids(chat_format, chat_format.tokenizer))
    assert config["pad_token_id"] == chat_format.tokenizer.pad_id
    assert chat_format.end_of_turn_id in config["eos_token_id"]
    assert chat_format.tokenizer.eos_id in config["eos_token_id"]
