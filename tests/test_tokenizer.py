"""Specification of easyppo.data.tokenizer: loading, special ids, start/continuation encoding.

Reference tokenisations come from `transformers` (test-only dependency) loading the same files.
"""

import builtins
import json
import os
import pickle
import shutil

import pytest
from etils import epath
from etils.epath import testing as epath_testing
from helpers.tokenizers import (
    LLAMA3_CHAT_TEMPLATE,
    make_sentencepiece_hf_dir,
    make_tiny_hf_tokenizer_dir,
    train_tiny_sentencepiece,
)

from easyppo.data.tokenizer import load_tokenizer

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "line one\nline two",
    "tabs\tand  double spaces",
    "ünïcödé ✓ 🙂",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "sp_model": train_tiny_sentencepiece(root),
        "sp_model_with_pad": train_tiny_sentencepiece(root, pad_piece=True, filename="with_pad.model"),
        "sp_dir": make_sentencepiece_hf_dir(root),
        "hf_dir": make_tiny_hf_tokenizer_dir(root),
    }


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


# --- sentencepiece ---------------------------------------------------------------------------------


def test_sentencepiece_encode_matches_transformers_llama_tokenizer(files, transformers):
    reference = transformers.AutoTokenizer.from_pretrained(files["sp_dir"], legacy=True)
    tokenizer = load_tokenizer(files["sp_dir"], pad_id=0)
    for text in TEXTS:
        assert tokenizer.encode(text) == reference(text, add_special_tokens=False).input_ids, text


def test_encode_continuation_matches_text_after_a_special_token_in_non_legacy_llama(files, transformers):
    # Non-legacy Llama tokenisation adds no dummy-prefix space after "<s>": exactly a continuation.
    reference = transformers.AutoTokenizer.from_pretrained(files["sp_dir"], legacy=False)
    tokenizer = load_tokenizer(files["sp_dir"], pad_id=0)
    for text in TEXTS:
        expected = reference("<s>" + text, add_special_tokens=False).input_ids[1:]
        assert tokenizer.encode_continuation(text) == expected, text


def test_encode_starts_with_the_dummy_prefix_space_and_continuation_does_not(files):
    tokenizer = load_tokenizer(files["sp_model"], pad_id=0)
    assert tokenizer.id_to_token(tokenizer.encode("Paris")[0]).startswith("▁")
    assert not tokenizer.id_to_token(tokenizer.encode_continuation("Paris")[0]).startswith("▁")


def test_sentencepiece_special_ids_default_to_the_model(files):
    tokenizer = load_tokenizer(files["sp_model_with_pad"])
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    assert [tokenizer.id_to_token(i) for i in (1, 2, 3)] == ["<s>", "</s>", "<pad>"]


def test_unk_is_an_acceptable_pad_in_a_byte_fallback_model(files):
    # Llama 2 has no pad token; with byte fallback <unk> (id 0) is never produced, so it may pad.
    tokenizer = load_tokenizer(files["sp_model"], pad_id=0)
    assert tokenizer.pad_id == 0
    assert not tokenizer.text_can_produce(0)


# --- Hugging Face tokenizer.json -------------------------------------------------------------------


def test_hf_directory_reads_special_tokens_and_chat_template_from_tokenizer_config(files):
    tokenizer = load_tokenizer(files["hf_dir"])
    assert tokenizer.bos_id == tokenizer.token_to_id("<|begin_of_text|>")
    assert tokenizer.eos_id == tokenizer.token_to_id("<|eot_id|>")
    assert tokenizer.pad_id == tokenizer.token_to_id("<|finetune_right_pad_id|>")
    assert tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE


def test_hf_directory_falls_back_to_special_tokens_map(files, tmp_path):
    directory = shutil.copytree(files["hf_dir"], tmp_path / "hf")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
        del config[key]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    special_tokens_map = {
        "bos_token": {"content": "<|begin_of_text|>"},  # The serialised-AddedToken spelling.
        "eos_token": "<|end_of_text|>",
        "pad_token": "<|reserved_special_token_0|>",
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    tokenizer = load_tokenizer(directory)
    assert tokenizer.bos_id == tokenizer.token_to_id("<|begin_of_text|>")
    assert tokenizer.eos_id == tokenizer.token_to_id("<|end_of_text|>")
    assert tokenizer.pad_id == tokenizer.token_to_id("<|reserved_special_token_0|>")


def test_chat_template_jinja_file_is_read(files, tmp_path):
    directory = shutil.copytree(files["hf_dir"], tmp_path / "hf")
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer(directory).chat_template == "{{ messages[0]['content'] }}"


def test_named_chat_templates_use_the_default_one(files, tmp_path):
    directory = shutil.copytree(files["hf_dir"], tmp_path / "hf")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(directory).chat_template == "chat"


def test_directory_with_both_files_uses_tokenizer_json(files, tmp_path):
    directory = shutil.copytree(files["hf_dir"], tmp_path / "hf")
    shutil.copy(files["sp_model"], directory / "tokenizer.model")
    sentencepiece_vocab_size = load_tokenizer(files["sp_model"], pad_id=0).vocab_size
    assert (
        load_tokenizer(directory).vocab_size == load_tokenizer(files["hf_dir"]).vocab_size != sentencepiece_vocab_size
    )


def test_chat_template_argument_overrides_the_shipped_one(files):
    assert load_tokenizer(files["hf_dir"], chat_template="{{ 'x' }}").chat_template == "{{ 'x' }}"


def test_hf_encode_matches_transformers_autotokenizer(files, transformers):
    reference = transformers.AutoTokenizer.from_pretrained(files["hf_dir"])
    tokenizer = load_tokenizer(files["hf_dir"])
    for text in TEXTS:
        assert tokenizer.encode(text) == reference(text, add_special_tokens=False).input_ids, text
        assert tokenizer.encode_continuation(text) == tokenizer.encode(text), "byte-level BPE has no dummy prefix"


def test_bare_tokenizer_json_needs_explicit_bos_and_eos(files):
    path = files["hf_dir"] / "tokenizer.json"
    with pytest.raises(ValueError, match="no bos token.*bare tokenizer.json"):
        load_tokenizer(path)
    tokenizer = load_tokenizer(
        path, bos_id="<|begin_of_text|>", eos_id="<|eot_id|>", pad_id="<|finetune_right_pad_id|>"
    )
    assert tokenizer.eos_id == tokenizer.token_to_id("<|eot_id|>")
    assert tokenizer.chat_template is None


def _converted_llama2_json(sp_dir, out_dir, transformers, variant):
    """Our sentencepiece model as tokenizer.json, in the three ways Llama 2 files spell the dummy prefix."""
    legacy = variant == "metaspace_always"
    transformers.AutoTokenizer.from_pretrained(sp_dir, legacy=legacy).save_pretrained(out_dir)
    path = out_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    assert spec["pre_tokenizer"]["prepend_scheme"] == ("always" if legacy else "first")
    if variant == "prepend_normalizer":  # The original Llama 2 tokenizer.json layout.
        spec["pre_tokenizer"] = None
        spec["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        }
        path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("variant", ["metaspace_always", "metaspace_first", "prepend_normalizer"])
def test_tokenizer_json_of_a_sentencepiece_model_encodes_like_sentencepiece(files, transformers, tmp_path, variant):
    sentencepiece_tokenizer = load_tokenizer(files["sp_dir"] / "tokenizer.model", pad_id=0)
    json_path = _converted_llama2_json(files["sp_dir"], tmp_path, transformers, variant)
    json_tokenizer = load_tokenizer(
        json_path, bos_id="<s>", eos_id="</s>", pad_id="<unk>", allow_pad_as_real_token=True
    )
    for text in TEXTS:  # Texts without leading whitespace: there Metaspace and sentencepiece agree.
        assert json_tokenizer.encode(text) == sentencepiece_tokenizer.encode(text), text
        assert json_tokenizer.encode_continuation(text) == sentencepiece_tokenizer.encode_continuation(text), text
    for text in [" 4", *TEXTS]:
        ids = sentencepiece_tokenizer.encode_continuation(text)
        assert json_tokenizer.decode(ids, continuation=True) == text, text


# --- both backends ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sentencepiece", "tokenizers"])
def tokenizer(request, files):
    if request.param == "sentencepiece":
        return load_tokenizer(files["sp_model"], pad_id=0)
    return load_tokenizer(files["hf_dir"])


def test_decode_inverts_encode_and_encode_continuation(tokenizer):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.decode(tokenizer.encode_continuation(text)) == text


def test_continuation_round_trip_keeps_a_leading_space(tokenizer):
    for text in [" 4", "  indented", *TEXTS]:
        assert tokenizer.decode(tokenizer.encode_continuation(text), continuation=True) == text


def test_decode_writes_special_tokens_only_when_asked(tokenizer):
    ids = [tokenizer.bos_id, *tokenizer.encode("Hello world"), tokenizer.eos_id]
    bos, eos = tokenizer.id_to_token(tokenizer.bos_id), tokenizer.id_to_token(tokenizer.eos_id)
    assert tokenizer.decode(ids) == "Hello world"
    assert tokenizer.decode(ids, skip_special_tokens=False) == f"{bos}Hello world{eos}"


def test_encode_keeps_special_token_strings_as_text(tokenizer):
    eos = tokenizer.id_to_token(tokenizer.eos_id)
    ids = tokenizer.encode(f"a{eos}b")
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == f"a{eos}b"


def test_special_ids_can_be_given_as_ids_or_token_strings(files):
    by_id = load_tokenizer(files["sp_model"], bos_id=1, eos_id=2, pad_id=0)
    by_token = load_tokenizer(files["sp_model"], bos_id="<s>", eos_id="</s>", pad_id="<unk>")
    assert (
        (by_id.bos_id, by_id.eos_id, by_id.pad_id) == (by_token.bos_id, by_token.eos_id, by_token.pad_id) == (1, 2, 0)
    )
    swapped = load_tokenizer(files["hf_dir"], eos_id="<|end_of_text|>")
    assert swapped.eos_id == swapped.token_to_id("<|end_of_text|>")


def test_missing_pad_is_an_error_that_says_how_to_choose_one(files):
    with pytest.raises(ValueError, match="no pad token.*pass pad_id=.*allow_pad_as_real_token"):
        load_tokenizer(files["sp_model"])


@pytest.mark.parametrize(
    "pad, message",
    [("</s>", "equals eos_id"), ("<s>", "equals bos_id"), ("▁the", "regular token that text encodes to")],
)
def test_pad_that_is_a_real_token_is_rejected(files, pad, message):
    with pytest.raises(ValueError, match=message):
        load_tokenizer(files["sp_model"], pad_id=pad)


def test_pad_that_is_a_real_token_is_accepted_when_explicitly_allowed(files):
    tokenizer = load_tokenizer(files["sp_model"], pad_id="</s>", allow_pad_as_real_token=True)
    assert tokenizer.pad_id == tokenizer.eos_id == 2


def test_pad_from_config_is_checked_too(files, tmp_path):
    directory = shutil.copytree(files["hf_dir"], tmp_path / "hf")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|eot_id|>"  # Common in published Llama 3 fine-tunes: pad = EOS.
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="equals eos_id"):
        load_tokenizer(directory)


def test_special_id_outside_the_vocabulary_is_rejected(files):
    with pytest.raises(ValueError, match="eos_id=512 is not a token id"):
        load_tokenizer(files["sp_model"], eos_id=512, pad_id=0)


def test_special_token_string_missing_from_the_vocabulary_is_rejected(files):
    with pytest.raises(ValueError, match="'<\\|eot_id\\|>' is not a token"):
        load_tokenizer(files["sp_model"], eos_id="<|eot_id|>", pad_id=0)


def test_config_token_missing_from_the_vocabulary_names_the_file(files, tmp_path):
    directory = shutil.copytree(files["sp_dir"], tmp_path / "sp")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["pad_token"] = "<pad>"  # A token added to tokenizer.json only, absent from tokenizer.model.
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="tokenizer_config.json sets pad_token='<pad>', which is not in the vocabulary"
    ):
        load_tokenizer(directory)


def test_fingerprint_is_stable_across_loads_and_depends_on_special_ids(files):
    first = load_tokenizer(files["sp_model"], pad_id=0)
    assert load_tokenizer(files["sp_model"], pad_id=0).fingerprint == first.fingerprint
    assert (
        load_tokenizer(files["sp_model"], pad_id="</s>", allow_pad_as_real_token=True).fingerprint != first.fingerprint
    )
    assert load_tokenizer(files["sp_model_with_pad"], pad_id=0).fingerprint != first.fingerprint


def test_tokenizer_survives_pickling_for_data_workers(tokenizer):
    restored = pickle.loads(pickle.dumps(tokenizer))
    eos = tokenizer.id_to_token(tokenizer.eos_id)
    for text in [*TEXTS, f"a{eos}b"]:
        assert restored.encode(text) == tokenizer.encode(text)
        assert restored.encode_continuation(text) == tokenizer.encode_continuation(text)
    assert restored.fingerprint == tokenizer.fingerprint


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match=f"token id {tokenizer.vocab_size} is outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


# --- paths -----------------------------------------------------------------------------------------


def test_epath_path_objects_are_accepted(files):
    tokenizer = load_tokenizer(epath.Path(files["sp_model"]), pad_id=0)
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"


def test_gs_paths_are_read_through_epath(files):
    # Every file operation on gs:// is redirected to the local fixture directory: no network.
    local_root = os.fspath(files["hf_dir"])

    def local(path):
        return os.fspath(path).replace("gs://bucket/llama3", local_root)

    with epath_testing.mock_epath(
        open=lambda _, path, *args, **kwargs: builtins.open(local(path), *args, **kwargs),
        exists=lambda _, path: os.path.exists(local(path)),
        isdir=lambda _, path: os.path.isdir(local(path)),
    ):
        tokenizer = load_tokenizer("gs://bucket/llama3")
    assert tokenizer.source == "gs://bucket/llama3"
    assert tokenizer.fingerprint == load_tokenizer(files["hf_dir"]).fingerprint


def test_missing_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere.model")


def test_directory_without_tokenizer_files_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)


def test_unrecognised_file_type_is_rejected(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="cannot tell what kind of tokenizer"):
        load_tokenizer(tmp_path / "vocab.txt")


@pytest.mark.parametrize(
    "filename, message", [("bad.model", "not a valid sentencepiece model"), ("bad.json", "not a valid tokenizer.json")]
)
def test_corrupt_tokenizer_file_is_rejected_with_its_path(tmp_path, filename, message):
    (tmp_path / filename).write_bytes(b"\x00 not a tokenizer")
    with pytest.raises(ValueError, match=f"{filename} is {message}"):
        load_tokenizer(tmp_path / filename, bos_id=0, eos_id=0, pad_id=0)
