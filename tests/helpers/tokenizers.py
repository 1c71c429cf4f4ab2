"""Tiny tokenizers built on the fly, so tests never download one.

* :func:`train_tiny_sentencepiece`: a byte-fallback BPE sentencepiece model shaped like Llama 2's
  (``<unk>``=0, ``<s>``=1, ``</s>``=2, dummy-prefix space, no normalisation), trained in ~0.05 s.
* :func:`make_sentencepiece_hf_dir`: that model in the layout of a Llama 2 Hugging Face checkpoint
  (``tokenizer.model`` + ``tokenizer_config.json``), which ``transformers.AutoTokenizer`` loads too.
* :func:`make_tiny_hf_tokenizer_dir`: a byte-level BPE ``tokenizer.json`` shaped like Llama 3's
  (Llama 3 pre-tokenizer regex and special tokens), with ``tokenizer_config.json`` and
  ``special_tokens_map.json``.

Import as ``from helpers.tokenizers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import io
import json
import pathlib

# A few KB of plain English. It has no newlines and no "<", "|" or ">", so the chat-format markup
# always falls back to bytes or single characters, as it does in the real Llama 2 vocabulary.
CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Hello world, and hello again to everyone in the room. "
    "Paris is the capital of France, and Berlin is the capital of Germany. "
    "Rome is the capital of Italy; Madrid is the capital of Spain. "
    "A tokenizer splits text into pieces, and a model predicts the next piece. "
    "The assistant answers the question of the user politely and precisely. "
    "The system message sets the tone of the whole conversation. "
    "Reinforcement learning from human feedback tunes a policy against a reward model. "
    "Preference data pairs a chosen response with a rejected response for the same prompt. "
    "Two plus two is four, three times three is nine, and ten minus one is nine as well. "
    "In 1969 people walked on the moon, and in 2024 models wrote poems about it. "
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells. "
    "How are you today? I am fine, thank you, and how are you? "
    "Please write a short story about a robot who learns to paint with bright colours. "
    "The weather is sunny in the morning, cloudy at noon and rainy in the evening. "
    "Water boils at one hundred degrees and freezes at zero degrees on the Celsius scale. "
    "What is the capital of France? The capital of France is Paris. "
    "Explain why the sky is blue in one sentence. Sunlight scatters off the air, and blue scatters most. "
    "Good morning! Good evening! Good night, and sleep well. "
    "Language models learn from large amounts of text written by many different people. "
)

#: Llama 3's special tokens, in Llama 3's order (the real vocabulary places them at 128000+).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
)

# The pre-tokenizer regex Llama 3's tokenizer.json uses.
_LLAMA3_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

#: The Llama 3 Instruct conversation layout as a Jinja chat template: BOS once, then per message
#: ``<|start_header_id|>role<|end_header_id|>\n\n`` + trimmed content + ``<|eot_id|>``.
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

#: The Tulu conversation layout as a Jinja chat template (no BOS: Tulu tokenizers add it themselves).
#: A newline follows each tag and each system/user content; EOS ends each assistant content, and a
#: newline separates it from the next turn.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tiny_sentencepiece(
    tmp_dir: str | pathlib.Path,
    *,
    vocab_size: int = 512,
    pad_piece: bool = False,
    filename: str = "tiny.model",
) -> pathlib.Path:
    """Trains a Llama-2-shaped sentencepiece BPE model on :data:`CORPUS`; returns the ``.model`` path.

    Args:
      tmp_dir: directory to write the model into.
      vocab_size: 256 byte pieces + specials + characters + merges.
      pad_piece: add a ``<pad>`` control piece at id 3 (Llama 2 itself has none).
      filename: name of the written model file.
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.split(". ")),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3 if pad_piece else -1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    path = pathlib.Path(tmp_dir) / filename
    path.write_bytes(model.getvalue())
    return path


def make_sentencepiece_hf_dir(tmp_dir: str | pathlib.Path, *, chat_template: str | None = None) -> pathlib.Path:
    """A Llama-2-style Hugging Face tokenizer directory around :func:`train_tiny_sentencepiece`'s model."""
    directory = pathlib.Path(tmp_dir) / "sentencepiece_hf"
    directory.mkdir(parents=True, exist_ok=True)
    train_tiny_sentencepiece(directory, filename="tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def make_tiny_hf_tokenizer_dir(
    tmp_dir: str | pathlib.Path,
    *,
    vocab_size: int = 600,
    chat_template: str | None = LLAMA3_CHAT_TEMPLATE,
) -> pathlib.Path:
    """A Llama-3-style Hugging Face tokenizer directory; returns the directory.

    ``tokenizer.json`` is a byte-level BPE trained on :data:`CORPUS` with Llama 3's pre-tokenizer and
    the :data:`LLAMA3_SPECIAL_TOKENS` appended after the regular vocabulary. ``tokenizer_config.json``
    names ``<|begin_of_text|>`` as BOS, ``<|eot_id|>`` as EOS (as Llama 3 Instruct does) and
    ``<|finetune_right_pad_id|>`` as pad, and carries ``chat_template``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS.split(". "), trainer)
    tokenizer.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )

    directory = pathlib.Path(tmp_dir) / "llama3_hf"
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    special = {"bos_token": bos, "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        **special,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return directory
