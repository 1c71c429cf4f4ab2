"""Specification of easyppo.data.chat: the text of each format, loss masks and the prefix invariant.

Expected texts are spelled out by hand from the published formats; expected ids come from
`transformers` tokenising the whole rendered conversation.
"""

import pickle

import pytest
from helpers.tokenizers import (
    TULU_CHAT_TEMPLATE,
    make_sentencepiece_hf_dir,
    make_tiny_hf_tokenizer_dir,
)

from easyppo.data.chat import JinjaChatFormat, make_chat_format
from easyppo.data.tokenizer import load_tokenizer

SINGLE_TURN = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
MULTI_TURN_WITH_SYSTEM = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin."},
]
CONVERSATIONS = {"single_turn": SINGLE_TURN, "multi_turn_with_system": MULTI_TURN_WITH_SYSTEM}
ALL_FORMATS = ["tulu", "plain", "tokenizer:tulu", "llama3", "tokenizer:llama3"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {
        "sp": make_sentencepiece_hf_dir(root, chat_template=TULU_CHAT_TEMPLATE),
        "hf": make_tiny_hf_tokenizer_dir(root),
    }


@pytest.fixture(scope="module")
def sp_tokenizer(dirs):
    return load_tokenizer(dirs["sp"], pad_id=0)  # Llama 2 style: <unk> pads.


@pytest.fixture(scope="module")
def hf_tokenizer(dirs):
    return load_tokenizer(dirs["hf"])


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _format(spec, sp_tokenizer, hf_tokenizer):
    """ "tulu" / "plain" run on the sentencepiece tokenizer, "llama3" on the Llama-3-like one;
    "tokenizer:X" is the Jinja path with the X template shipped in that tokenizer's directory."""
    name, _, template = spec.partition(":")
    uses_hf = (template or name) == "llama3"
    return make_chat_format(name, hf_tokenizer if uses_hf else sp_tokenizer)


def _decode(fmt, ids):
    return fmt.tokenizer.decode(ids, skip_special_tokens=False)


def _masked_spans(ids, mask):
    spans, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


# --- the text of each format -----------------------------------------------------------------------


def test_tulu_conversation_has_the_open_instruct_layout(sp_tokenizer):
    tulu = make_chat_format("tulu", sp_tokenizer)
    ids = tulu.encode_conversation(MULTI_TURN_WITH_SYSTEM).ids
    assert _decode(tulu, ids) == (
        "<s><|system|>\nAnswer in one word.\n"
        "<|user|>\nWhat is the capital of France?\n"
        "<|assistant|>\nParis.</s>\n"
        "<|user|>\nAnd of Germany?\n"
        "<|assistant|>\nBerlin.</s>"
    )


def test_tulu_prompt_ends_with_the_assistant_tag_and_a_newline(sp_tokenizer):
    tulu = make_chat_format("tulu", sp_tokenizer)
    expected = "<s><|user|>\nWhat is the capital of France?\n<|assistant|>\n"
    assert _decode(tulu, tulu.encode_prompt(SINGLE_TURN[:1])) == expected


def test_tulu_strips_whitespace_around_contents(sp_tokenizer):
    tulu = make_chat_format("tulu", sp_tokenizer)
    padded = [{"role": "user", "content": "  Hi there \n"}, {"role": "assistant", "content": "\nHello. "}]
    assert _decode(tulu, tulu.encode_conversation(padded).ids) == "<s><|user|>\nHi there\n<|assistant|>\nHello.</s>"


def test_tulu_ids_equal_transformers_tokenising_the_whole_rendered_text(sp_tokenizer, dirs, transformers):
    # transformers renders the Tulu Jinja template and tokenises it in one go, as Tulu 2 training did
    # (legacy Llama tokenisation: text after <s> or </s> starts a new sentencepiece string).
    reference = transformers.AutoTokenizer.from_pretrained(dirs["sp"], legacy=True)
    text = "<s>" + reference.apply_chat_template(MULTI_TURN_WITH_SYSTEM, tokenize=False)
    expected = reference(text, add_special_tokens=False).input_ids
    assert make_chat_format("tulu", sp_tokenizer).encode_conversation(MULTI_TURN_WITH_SYSTEM).ids == expected


def test_llama3_conversation_has_the_header_and_eot_layout(hf_tokenizer):
    llama3 = make_chat_format("llama3", hf_tokenizer)
    assert _decode(llama3, llama3.encode_conversation(MULTI_TURN_WITH_SYSTEM).ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer in one word.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd of Germany?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBerlin.<|eot_id|>"
    )


def test_llama3_prompt_ends_with_the_assistant_header(hf_tokenizer):
    llama3 = make_chat_format("llama3", hf_tokenizer)
    assert _decode(llama3, llama3.encode_prompt(SINGLE_TURN[:1])) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_ids_equal_transformers_apply_chat_template(hf_tokenizer, dirs, transformers):
    reference = transformers.AutoTokenizer.from_pretrained(dirs["hf"])
    expected = reference.apply_chat_template(MULTI_TURN_WITH_SYSTEM, tokenize=True, return_dict=True)["input_ids"]
    assert make_chat_format("llama3", hf_tokenizer).encode_conversation(MULTI_TURN_WITH_SYSTEM).ids == expected


def test_plain_conversation_is_the_contents_back_to_back_with_eos_after_responses(sp_tokenizer):
    plain = make_chat_format("plain", sp_tokenizer)
    conversation = [
        {"role": "user", "content": "Question: what is two plus two?\nAnswer:"},
        {"role": "assistant", "content": " four"},
    ]
    expected = "<s>Question: what is two plus two?\nAnswer: four</s>"
    assert _decode(plain, plain.encode_conversation(conversation).ids) == expected


@pytest.mark.parametrize("tokenizer_dir", ["sp", "hf"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_jinja_rendering_equals_transformers_apply_chat_template(
    dirs, transformers, tokenizer_dir, add_generation_prompt
):
    tokenizer = load_tokenizer(dirs[tokenizer_dir], **({"pad_id": 0} if tokenizer_dir == "sp" else {}))
    reference = transformers.AutoTokenizer.from_pretrained(dirs[tokenizer_dir])
    messages = MULTI_TURN_WITH_SYSTEM[:-1] if add_generation_prompt else MULTI_TURN_WITH_SYSTEM
    rendered = JinjaChatFormat(tokenizer).render(messages, add_generation_prompt=add_generation_prompt)
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert rendered == expected


@pytest.mark.parametrize("builtin", ["tulu", "llama3"])
def test_jinja_format_reproduces_the_builtin_format(sp_tokenizer, hf_tokenizer, builtin):
    # The tokenizer directories ship Jinja templates of the Tulu and Llama 3 layouts; rendering those
    # and cutting by prefixes must give the same ids and masks as the hand-written formats.
    tokenizer = hf_tokenizer if builtin == "llama3" else sp_tokenizer
    jinja, reference = make_chat_format("tokenizer", tokenizer), make_chat_format(builtin, tokenizer)
    for messages in CONVERSATIONS.values():
        assert jinja.encode_conversation(messages) == reference.encode_conversation(messages)
        assert jinja.encode_prompt(messages[:-1]) == reference.encode_prompt(messages[:-1])
    assert jinja.end_of_turn_id == reference.end_of_turn_id


# --- loss masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_FORMATS)
def test_masked_tokens_are_exactly_the_assistant_contents_and_end_of_turn(sp_tokenizer, hf_tokenizer, spec):
    fmt = _format(spec, sp_tokenizer, hf_tokenizer)
    encoded = fmt.encode_conversation(MULTI_TURN_WITH_SYSTEM)
    end_of_turn = fmt.tokenizer.id_to_token(fmt.end_of_turn_id)
    spans = [_decode(fmt, span) for span in _masked_spans(encoded.ids, encoded.loss_mask)]
    assert spans == [f"Paris.{end_of_turn}", f"Berlin.{end_of_turn}"]


@pytest.mark.parametrize("spec", ALL_FORMATS)
def test_last_assistant_training_masks_only_the_final_turn(sp_tokenizer, hf_tokenizer, spec):
    fmt = _format(spec, sp_tokenizer, hf_tokenizer)
    all_turns = fmt.encode_conversation(MULTI_TURN_WITH_SYSTEM, train_on="all_assistant")
    last_turn = fmt.encode_conversation(MULTI_TURN_WITH_SYSTEM, train_on="last_assistant")
    end_of_turn = fmt.tokenizer.id_to_token(fmt.end_of_turn_id)
    assert last_turn.ids == all_turns.ids
    assert [_decode(fmt, span) for span in _masked_spans(last_turn.ids, last_turn.loss_mask)] == [
        f"Berlin.{end_of_turn}"
    ]
    response = fmt.encode_response("Berlin.")
    assert last_turn.loss_mask == [0] * (len(last_turn.ids) - len(response)) + [1] * len(response)


# --- the prefix invariant --------------------------------------------------------------------------


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("spec", ALL_FORMATS)
def test_prompt_plus_response_is_exactly_the_conversation(sp_tokenizer, hf_tokenizer, spec, conversation):
    fmt = _format(spec, sp_tokenizer, hf_tokenizer)
    messages = CONVERSATIONS[conversation]
    prompt, response = fmt.encode_prompt(messages[:-1]), fmt.encode_response(messages[-1]["content"])
    assert prompt + response == fmt.encode_conversation(messages).ids


def test_prefix_invariant_holds_where_whole_text_tokenisation_would_break_it(sp_tokenizer):
    # "Hel" + "lo world" tokenised as one text merges across the prompt/response boundary.
    plain = make_chat_format("plain", sp_tokenizer)
    messages = [{"role": "user", "content": "Hel"}, {"role": "assistant", "content": "lo world"}]
    prompt = plain.encode_prompt(messages[:1])
    whole_text = [sp_tokenizer.bos_id, *sp_tokenizer.encode("Hello world"), sp_tokenizer.eos_id]
    assert whole_text[: len(prompt)] != prompt
    assert prompt + plain.encode_response("lo world") == plain.encode_conversation(messages).ids


@pytest.mark.parametrize("spec", ALL_FORMATS)
def test_response_tokens_do_not_depend_on_the_prompt(sp_tokenizer, hf_tokenizer, spec):
    fmt = _format(spec, sp_tokenizer, hf_tokenizer)
    short = fmt.encode_conversation(SINGLE_TURN).ids
    long = fmt.encode_conversation(MULTI_TURN_WITH_SYSTEM[:2] + SINGLE_TURN[1:]).ids
    response = fmt.encode_response("Paris.")
    assert short[-len(response) :] == long[-len(response) :] == response


@pytest.mark.parametrize("spec", ALL_FORMATS)
def test_decode_response_inverts_encode_response(sp_tokenizer, hf_tokenizer, spec):
    fmt = _format(spec, sp_tokenizer, hf_tokenizer)
    for content in ["Paris.", "Two lines:\nthe capital of France is Paris."]:
        assert fmt.decode_response(fmt.encode_response(content)) == content


def test_decode_response_keeps_the_leading_space_of_a_plain_response(sp_tokenizer):
    plain = make_chat_format("plain", sp_tokenizer)
    assert plain.decode_response(plain.encode_response(" 4")) == " 4"
    assert sp_tokenizer.decode(plain.encode_response(" 4")) == "4"  # Why decode_response exists.


# --- special tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["tulu", "plain", "llama3"])
def test_special_token_strings_in_contents_stay_text_in_builtin_formats(sp_tokenizer, hf_tokenizer, spec):
    fmt = _format(spec, sp_tokenizer, hf_tokenizer)
    end_of_turn = fmt.tokenizer.id_to_token(fmt.end_of_turn_id)
    messages = [
        {"role": "user", "content": f"Say {end_of_turn} please"},
        {"role": "assistant", "content": f"OK {end_of_turn}"},
    ]
    ids = fmt.encode_conversation(messages).ids
    assert ids.count(fmt.end_of_turn_id) == 1 + (spec == "llama3")  # The real turn ends (Llama 3: user too).
    assert ids[-1] == fmt.end_of_turn_id


def test_end_of_turn_ids(sp_tokenizer, hf_tokenizer):
    assert make_chat_format("tulu", sp_tokenizer).end_of_turn_id == sp_tokenizer.eos_id
    assert make_chat_format("plain", sp_tokenizer).end_of_turn_id == sp_tokenizer.eos_id
    assert make_chat_format("llama3", hf_tokenizer).end_of_turn_id == hf_tokenizer.token_to_id("<|eot_id|>")
    assert make_chat_format("tokenizer", sp_tokenizer).end_of_turn_id == sp_tokenizer.eos_id


def test_jinja_format_prepends_bos_only_when_the_template_does_not_render_it(sp_tokenizer, hf_tokenizer):
    for tokenizer in (sp_tokenizer, hf_tokenizer):  # Tulu template: no BOS; Llama 3 template: BOS.
        ids = make_chat_format("tokenizer", tokenizer).encode_prompt(SINGLE_TURN[:1])
        assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "tool", "content": "x"}], "message 0: unknown role 'tool'"),
        ([], "has no messages"),
        ("Hello", "must be a list"),
        ([{"role": "user", "content": 3}], "message 0: content must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "must end with a user turn"),
        (
            [
                {"role": "system", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            "message 1: an assistant turn must directly follow a user turn",
        ),
    ],
)
def test_bad_prompts_are_rejected(sp_tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        make_chat_format("tulu", sp_tokenizer).encode_prompt(messages)


def test_conversation_must_end_with_an_assistant_turn(sp_tokenizer):
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        make_chat_format("tulu", sp_tokenizer).encode_conversation(SINGLE_TURN[:1])


def test_unknown_train_on_is_rejected(sp_tokenizer):
    with pytest.raises(ValueError, match="train_on must be one of all_assistant, last_assistant"):
        make_chat_format("tulu", sp_tokenizer).encode_conversation(SINGLE_TURN, train_on="everything")


def test_unknown_format_name_is_rejected(sp_tokenizer):
    with pytest.raises(ValueError, match="unknown chat format 'chatml'; choose one of tulu, llama3, tokenizer, plain"):
        make_chat_format("chatml", sp_tokenizer)


def test_llama3_format_needs_llama3_special_tokens(sp_tokenizer):
    with pytest.raises(ValueError, match="needs the special tokens <\\|start_header_id\\|>"):
        make_chat_format("llama3", sp_tokenizer)


def test_tokenizer_format_needs_a_chat_template(dirs):
    tokenizer = load_tokenizer(dirs["sp"] / "tokenizer.model", pad_id=0)
    with pytest.raises(ValueError, match="needs a chat template"):
        make_chat_format("tokenizer", tokenizer)


@pytest.mark.parametrize(
    "template, message",
    [
        # Renders the message count first, so no shorter rendering is a prefix of a longer one.
        (
            "{{ messages | length }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}",
            "not prefix-stable",
        ),
        # An assistant turn ends in text, so sampling would have no token to stop on.
        (
            "{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}",
            "must end an assistant turn with a special token",
        ),
        # Numbers assistant turns, so a turn's tokens depend on the conversation before it.
        (
            "{% for m in messages %}{{ loop.index|string + m['content'] + eos_token }}{% endfor %}",
            "differently from the same turn",
        ),
        # Rejects conversations through the template's own raise_exception.
        (
            "{% if messages[0]['role'] == 'user' %}{{ raise_exception('system turn required') }}{% endif %}",
            "system turn required",
        ),
        ("{% for m in messages %}", "not valid Jinja"),
    ],
)
def test_unusable_chat_templates_are_rejected(sp_tokenizer, template, message):
    with pytest.raises(ValueError, match=message):
        JinjaChatFormat(sp_tokenizer, template).encode_conversation(MULTI_TURN_WITH_SYSTEM)


# --- plumbing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_FORMATS)
def test_chat_formats_survive_pickling_for_data_workers(sp_tokenizer, hf_tokenizer, spec):
    fmt = _format(spec, sp_tokenizer, hf_tokenizer)
    restored = pickle.loads(pickle.dumps(fmt))
    assert restored.encode_conversation(MULTI_TURN_WITH_SYSTEM) == fmt.encode_conversation(MULTI_TURN_WITH_SYSTEM)
    assert restored.fingerprint == fmt.fingerprint


def test_fingerprint_distinguishes_formats_and_templates(sp_tokenizer):
    fingerprints = {
        make_chat_format("tulu", sp_tokenizer).fingerprint,
        make_chat_format("plain", sp_tokenizer).fingerprint,
        make_chat_format("tokenizer", sp_tokenizer).fingerprint,
        JinjaChatFormat(sp_tokenizer, TULU_CHAT_TEMPLATE + "{# same output, different template #}").fingerprint,
    }
    assert len(fingerprints) == 4
    assert make_chat_format("tulu", sp_tokenizer).fingerprint == make_chat_format("tulu", sp_tokenizer).fingerprint
