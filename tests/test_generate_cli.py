"""Specification of ``easyppo generate``: a prompts file in, one JSONL row per completion out.

A tiny random policy and reward model are saved as Hugging Face directories (the policy with the
demo tokenizer beside it, as the train loop's export writes it). References are computed without the
CLI's data path: prompts are chat-formatted one by one with the chat format, completed by calling
``generation.generate`` directly on unsharded parameters, and scored by a plain reward-model forward
on the unpadded prompt + response ids.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.demo_data import DEMO_DATA, first_rows
from helpers.tokenizers import make_tiny_hf_tokenizer_dir, train_tiny_sentencepiece

from easyppo.cli import generate as generate_cli
from easyppo.data.chat import make_chat_format
from easyppo.data.export import save_tokenizer_files
from easyppo.data.tokenizer import load_tokenizer
from easyppo.models import generation, llama
from easyppo.run import generate as generate_lib
from easyppo.run import generate_options
from easyppo.run.generate_plan import plan_run
from easyppo.weights import huggingface

PAD = 3  # the demo tokenizer's <pad>
NEW_TOKENS = 8
NUM_PROMPTS = 10  # 8 prompts per batch on 8 devices: one full batch and one with 6 filler rows
MODEL = llama.get_preset("tiny", pad_token_id=PAD, max_position_embeddings=64)


def random_params(config: llama.LlamaConfig, kind: str, seed: int) -> dict:
    """Random float32 parameters in NumPy (norm scales 1, matrices with std 1/sqrt(fan-in)): no compile."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: llama.init_params(config, kind, jax.random.key(0)))

    def draw(path, leaf):
        if path[-1].key == "scale":
            return np.ones(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    tokenizer_path = str(DEMO_DATA / "tokenizer.model")
    tokenizer = load_tokenizer(tokenizer_path)
    policy_params = random_params(MODEL, "causal_lm", seed=0)
    reward_params = random_params(MODEL, "reward", seed=1)
    huggingface.save_hf(str(root / "policy"), MODEL, policy_params)
    save_tokenizer_files(tokenizer_path, tokenizer, str(root / "policy"))
    huggingface.save_hf(str(root / "reward"), MODEL, reward_params, "reward")
    prompts = first_rows(DEMO_DATA / "prompts_eval.jsonl", root / "prompts.jsonl", NUM_PROMPTS)
    return dict(
        root=root,
        policy=str(root / "policy"),
        reward=str(root / "reward"),
        prompts=prompts,
        messages=[json.loads(line)["messages"] for line in pathlib.Path(prompts).read_text().splitlines()],
        tokenizer=tokenizer,
        chat_format=make_chat_format("tulu", tokenizer),
        policy_params=policy_params,
        reward_params=reward_params,
        cache_dir=str(root / "cache"),
    )


def options(setup, output, **overrides) -> generate_options.GenerateOptions:
    values = dict(
        checkpoint=setup["policy"],
        prompts=setup["prompts"],
        output=str(output),
        max_new_tokens=NEW_TOKENS,
        batch_size=8,
        max_prompt_len=48,
        progress=False,
        cache_dir=setup["cache_dir"],
        num_proc=1,
    )
    return generate_options.GenerateOptions(**{**values, **overrides})


def flags(setup, output, *extra) -> list[str]:
    return [
        f"--checkpoint={setup['policy']}",
        f"--prompts={setup['prompts']}",
        f"--output={output}",
        f"--max_new_tokens={NEW_TOKENS}",
        "--batch_size=8",
        "--max_prompt_len=48",
        "--no_progress",
        f"--cache_dir={setup['cache_dir']}",
        "--num_proc=1",
        *extra,
    ]


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def greedy_rows(setup):
    """One greedy run of the CLI's Python entry point, with the reward model scoring every completion."""
    output = setup["root"] / "greedy.jsonl"
    generate_lib.generate_file(options(setup, output, greedy=True, reward_model=setup["reward"]))
    return read_rows(output)


@pytest.fixture(scope="module")
def reference(setup):
    """Greedy completions from ``generation.generate`` on prompts chat-formatted one at a time."""
    chat_format = setup["chat_format"]
    prompts = [chat_format.encode_prompt(messages) for messages in setup["messages"]]
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), PAD, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    sampling = generation.SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True, pad_token_id=PAD)
    out = generation.generate(
        setup["policy_params"],
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.key(0),
        model_config=MODEL,
        sampling=sampling,
    )
    tokens, response_mask = np.asarray(out.tokens), np.asarray(out.response_mask).astype(bool)
    return [
        dict(prompt_ids=prompt, response_ids=tokens[row][response_mask[row]].tolist(), finished=bool(out.finished[row]))
        for row, prompt in enumerate(prompts)
    ]


def tulu_prompt_text(messages) -> str:
    """The Tulu 2 prompt layout, written out from its definition."""
    turns = "".join(f"<|{m['role']}|>\n{m['content'].strip()}\n" for m in messages)
    return f"<s>{turns}<|assistant|>\n"


# ------------------------------------------------------------------------------------------ outputs


def test_greedy_completions_equal_direct_generation_on_the_same_prompts(setup, greedy_rows, reference):
    assert [row["index"] for row in greedy_rows] == list(range(NUM_PROMPTS))  # the filler rows are gone
    for row, expected in zip(greedy_rows, reference):
        assert row["response"] == setup["chat_format"].decode_response(expected["response_ids"])
        assert row["response_tokens"] == len(expected["response_ids"])
        assert row["finished"] == expected["finished"]


def test_prompt_field_is_the_chat_formatted_prompt(setup, greedy_rows):
    assert any(messages[0]["role"] == "system" for messages in setup["messages"])  # a multi-turn prompt too
    assert [row["prompt"] for row in greedy_rows] == [tulu_prompt_text(m) for m in setup["messages"]]


def test_reward_scores_equal_a_reward_model_forward_on_prompt_plus_response(setup, greedy_rows, reference):
    reward_forward = jax.jit(llama.make_model(MODEL, "reward").apply)
    for row, expected in zip(greedy_rows, reference):
        sequence = jnp.asarray([expected["prompt_ids"] + expected["response_ids"]], jnp.int32)  # no padding at all
        score = reward_forward({"params": setup["reward_params"]}, sequence)[0]
        np.testing.assert_allclose(row["score"], float(score), rtol=1e-4, atol=1e-5)


def test_num_samples_gives_that_many_distinct_samples_per_prompt(setup):
    output = setup["root"] / "sampled.jsonl"
    prompts = first_rows(DEMO_DATA / "prompts_eval.jsonl", setup["root"] / "four.jsonl", 4)
    summary = generate_lib.generate_file(options(setup, output, prompts=prompts, num_samples=3, temperature=1.0))
    rows = read_rows(output)
    assert summary.rows == len(rows) == 12
    assert [(row["index"], row["sample"]) for row in rows] == [(i, s) for i in range(4) for s in range(3)]
    for index in range(4):
        samples = [row for row in rows if row["index"] == index]
        assert len({row["prompt"] for row in samples}) == 1
        assert len({row["response"] for row in samples}) == 3


def test_prompts_per_batch_is_the_smallest_count_that_fits_the_mesh():
    for batch_size, samples, ways, hosts in [(3, 1, 8, 1), (3, 2, 8, 1), (8, 3, 8, 1), (5, 4, 8, 2), (1, 1, 1, 1)]:
        expected = next(n for n in range(batch_size, 10_000) if (n * samples) % ways == 0 and n % hosts == 0)
        assert generate_options.prompts_per_batch(batch_size, samples, ways, hosts) == expected


# ------------------------------------------------------------------------------------ stop tokens


def rig_to_always_emit(params, token_id: int) -> dict:
    """Makes greedy decoding emit ``token_id`` at every step, whatever the input.

    Hidden dimension 0 becomes a constant positive "bias" feature: every embedding has 100 there and no
    block writes to it (column 0 of o_proj and down_proj is zero), so after the final RMSNorm it is
    still positive; the LM head reads only that dimension, and only into ``token_id``'s logit.
    """
    params = jax.tree.map(np.copy, params)
    model = params["model"]
    model["embed_tokens"]["embedding"][:, 0] = 100.0
    for name, block in model.items():
        if name.startswith("layers_"):
            block["self_attn"]["o_proj"]["kernel"][:, 0] = 0.0
            block["mlp"]["down_proj"]["kernel"][:, 0] = 0.0
    lm_head = np.zeros_like(params["lm_head"]["kernel"])
    lm_head[0, token_id] = 1.0
    params["lm_head"]["kernel"] = lm_head
    return params


def test_generation_stops_at_the_chat_formats_end_of_turn_token_not_only_eos(tmp_path):
    # A Llama 3 base-model tokenizer: EOS is <|end_of_text|>, while chat turns end with <|eot_id|>.
    tokenizer_dir = make_tiny_hf_tokenizer_dir(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((tokenizer_dir / name).read_text())
        (tokenizer_dir / name).write_text(json.dumps({**config, "eos_token": "<|end_of_text|>"}))
    tokenizer = load_tokenizer(tokenizer_dir)
    eot = tokenizer.special_tokens["<|eot_id|>"]
    assert tokenizer.eos_id != eot
    config = llama.get_preset(
        "tiny",
        vocab_size=640,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    params = rig_to_always_emit(random_params(config, "causal_lm", seed=2), eot)
    huggingface.save_hf(str(tmp_path / "policy"), config, params, tokenizer_dir=str(tokenizer_dir))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello world"}) + "\n" + json.dumps({"prompt": "Good night"}) + "\n")

    output = tmp_path / "out.jsonl"
    generate_lib.generate_file(
        generate_options.GenerateOptions(
            checkpoint=str(tmp_path / "policy"),
            prompts=str(prompts),
            output=str(output),
            chat_format="llama3",
            greedy=True,
            max_new_tokens=NEW_TOKENS,
            max_prompt_len=32,
            progress=False,
            cache_dir=str(tmp_path / "cache"),
            num_proc=1,
        )
    )
    rows = read_rows(output)
    assert [(row["response_tokens"], row["finished"], row["response"]) for row in rows] == [(1, True, "")] * 2


# ----------------------------------------------------------------------------------- failures


def test_bad_prompt_row_fails_naming_file_row_and_field_before_loading_weights(setup, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Tell me about the ocean."})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": 5}]})
        + "\n"
    )
    output = tmp_path / "out.jsonl"
    output.write_text("previous results\n")

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights were loaded before the prompts were checked")

    monkeypatch.setattr(generate_lib.loading, "load_model", no_weights)
    assert generate_cli.main(flags(setup, output, f"--prompts={prompts}")) == 2
    assert f"{prompts}, row 2, field 'messages[0].content'" in capsys.readouterr().err
    assert output.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl"]


def test_run_failing_midway_leaves_existing_output_untouched_and_no_temporary_file(setup, tmp_path, monkeypatch):
    output = tmp_path / "out.jsonl"
    output.write_text("previous results\n")
    real_generate, calls = generate_lib.generation.generate, []

    def fail_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(generate_lib.generation, "generate", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="device lost"):
        generate_lib.generate_file(options(setup, output, greedy=True))
    assert output.read_text() == "previous results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def error_line(capsys) -> str:
    """The CLI's one ``error: ...`` line on stderr (log lines may surround it)."""
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    return line


def test_missing_checkpoint_exits_with_status_2_and_names_the_flag(setup, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert generate_cli.main(flags(setup, tmp_path / "out.jsonl", f"--checkpoint={missing}")) == 2
    assert error_line(capsys) == f"error: --checkpoint: {missing} does not exist"
    assert not (tmp_path / "out.jsonl").exists()


def test_checkpoint_without_tokenizer_files_needs_the_tokenizer_flag(setup, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(pathlib.Path(setup["policy"]) / "config.json", bare / "config.json")
    assert generate_cli.main(flags(setup, tmp_path / "out.jsonl", f"--checkpoint={bare}")) == 2
    error = error_line(capsys)
    assert error.startswith("error: --tokenizer: not given") and "pass --tokenizer=PATH" in error


def test_reward_model_flag_rejects_a_causal_lm(setup, tmp_path, capsys):
    assert generate_cli.main(flags(setup, tmp_path / "out.jsonl", f"--reward_model={setup['policy']}")) == 2
    assert "error: --reward_model:" in capsys.readouterr().err


def test_sampling_options_are_checked_naming_the_flag(setup, tmp_path, capsys):
    cases = [
        ("--top_p=0", "--top_p: must be in (0, 1]"),
        ("--temperature=0", "--temperature: must be > 0"),
        ("--num_samples=0", "--num_samples: must be at least 1"),
    ]
    for flag, message in cases:
        assert generate_cli.main(flags(setup, tmp_path / "out.jsonl", flag)) == 2
        assert message in capsys.readouterr().err


def test_a_reward_model_trained_with_another_tokenizer_is_refused_before_sampling(setup, tmp_path, capsys):
    foreign = tmp_path / "reward_other_tokenizer"
    shutil.copytree(setup["reward"], foreign)
    train_tiny_sentencepiece(foreign, vocab_size=400, pad_piece=True, filename="tokenizer.model")
    assert generate_cli.main(flags(setup, tmp_path / "out.jsonl", f"--reward_model={foreign}")) == 2
    assert "--reward_model: " in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------------------- prompts in the command


def inline_flags(setup, *extra) -> list[str]:
    return [
        f"--checkpoint={setup['policy']}",
        f"--max_new_tokens={NEW_TOKENS}",
        "--greedy",
        "--no_progress",
        f"--cache_dir={setup['cache_dir']}",
        "--num_proc=1",
        *extra,
    ]


def printed_completions(out: str) -> list[str]:
    """The completion texts of the CLI's printed output (a ``[prompt i, sample j]`` header before each)."""
    blocks = [block for block in out.split("[prompt ")[1:]]
    return [block.split("]\n", 1)[1].rstrip("\n") for block in blocks]


def test_a_prompt_on_the_command_line_prints_the_completion_of_its_chat_formatted_form(setup, greedy_rows, capsys):
    question = setup["messages"][0][-1]["content"]
    assert generate_cli.main(inline_flags(setup, "--prompt", question)) == 0
    (printed,) = printed_completions(capsys.readouterr().out)
    assert printed == greedy_rows[0]["response"]  # the same completion as from a prompts file


def test_prompts_on_standard_input_as_text_or_json_rows(setup, greedy_rows, capsys, monkeypatch):
    import io

    first = setup["messages"][0][-1]["content"]
    lines = f"{first}\n\n{json.dumps({'messages': setup['messages'][1]})}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert generate_cli.main(inline_flags(setup, "--prompts=-")) == 0
    assert printed_completions(capsys.readouterr().out) == [greedy_rows[0]["response"], greedy_rows[1]["response"]]


def test_a_prompt_with_an_output_file_writes_the_rows(setup, greedy_rows, tmp_path, capsys):
    output = tmp_path / "one.jsonl"
    question = setup["messages"][0][-1]["content"]
    assert generate_cli.main(inline_flags(setup, "--prompt", question, f"--output={output}")) == 0
    (row,) = read_rows(output)
    assert row["response"] == greedy_rows[0]["response"] and row["prompt"] == greedy_rows[0]["prompt"]


@pytest.mark.parametrize(
    "extra,message",
    [
        ((), "error: --prompts: give a prompts file, --prompts=- (standard input) or --prompt TEXT"),
        (("--prompts=x.jsonl",), "error: --output: name the JSONL file to write"),
        (("--prompt", "Hi", "--prompts=x.jsonl"), "error: --prompt: give prompts either with --prompt or"),
    ],
)
def test_inline_prompt_mistakes_are_one_line(setup, capsys, extra, message):
    assert generate_cli.main(inline_flags(setup, *extra)) == 2
    assert error_line(capsys).startswith(message)


def test_without_max_new_tokens_a_completion_gets_the_positions_the_model_has_left(setup, tmp_path):
    plan = plan_run(options(setup, tmp_path / "out.jsonl", max_new_tokens=None))
    room = MODEL.max_position_embeddings - plan.prompt_width
    assert room < generate_options.DEFAULT_MAX_NEW_TOKENS  # the tiny model's 64 positions bind
    assert plan.sampling.max_new_tokens == plan.options.max_new_tokens == room
