"""Generates the demo's data and tokenizer (the files in easyppo/configs/demo_data are its output, committed and shipped with the package).

The task is small enough for a tiny model on a CPU and has a hidden preference rule that a reward
model can learn and that DPO and PPO can then optimise:

* every prompt asks the assistant to describe a thing ("Tell me about the fox.");
* every response describes it with three adjectives drawn from a cheerful and a gloomy word list
  and ends with a closing remark chosen independently of them (so it carries no signal);
* **the rule**: the response with more cheerful adjectives is preferred. Pairs range from easy
  (three cheerful against none) to hard (two against one), so accuracy is not free.

SFT rows carry responses of every mood, so the SFT policy produces all of them; preference tuning
then has somewhere to go. The counting files are a verifiable task for GRPO: the prompt says how many
cheerful words to use and the row's ``answer`` holds the number. Run ``python demo/make_data.py`` to regenerate (deterministic).
"""

from __future__ import annotations

import io
import json
import pathlib
import random

CHEERFUL = ["bright", "kind", "lovely", "cheerful", "gentle", "warm", "merry", "friendly", "sunny", "graceful"]
GLOOMY = ["dull", "rude", "gloomy", "grim", "cold", "dreary", "nasty", "bleak", "sour", "clumsy"]
THINGS = [
    "fox",
    "river",
    "garden",
    "robot",
    "teacher",
    "city",
    "forest",
    "piano",
    "ocean",
    "mountain",
    "village",
    "library",
    "horse",
    "train",
    "castle",
    "bakery",
    "island",
    "market",
    "owl",
    "bridge",
]
PROMPTS = [
    "Tell me about the {thing}.",
    "Describe the {thing} in a few words.",
    "What is the {thing} like?",
    "Say something about the {thing}.",
]
CLOSINGS = ["That is all.", "I hope this helps.", "Ask me more if you like.", "So it goes."]
SYSTEM = "You are a helpful assistant."


def response(rng: random.Random, thing: str, cheerful: int) -> str:
    words = rng.sample(CHEERFUL, cheerful) + rng.sample(GLOOMY, 3 - cheerful)
    rng.shuffle(words)
    closing = rng.choice(CLOSINGS)
    return f"The {thing} is {words[0]}, {words[1]} and {words[2]}. {closing}"


def prompt_messages(rng: random.Random, thing: str) -> list[dict]:
    messages = [{"role": "user", "content": rng.choice(PROMPTS).format(thing=thing)}]
    if rng.random() < 0.2:  # some rows carry a system turn, as real chat data does
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return messages


def sft_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        rows.append(
            {
                "messages": prompt_messages(rng, thing)
                + [{"role": "assistant", "content": response(rng, thing, rng.randint(0, 3))}]
            }
        )
    return rows


def preference_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        better = rng.randint(1, 3)
        worse = rng.randint(0, better - 1)
        prompt = prompt_messages(rng, thing)
        rows.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": response(rng, thing, better)}],
                "rejected": prompt + [{"role": "assistant", "content": response(rng, thing, worse)}],
            }
        )
    return rows


def prompt_rows(rng: random.Random, n: int) -> list[dict]:
    return [{"messages": prompt_messages(rng, rng.choice(THINGS))} for _ in range(n)]


COUNTING_PROMPT = "Describe the {thing} with {n} nice words."


def counting_rows(rng: random.Random, n: int) -> list[dict]:
    """The verifiable task GRPO learns: the prompt asks for 0 or 3 cheerful words and the ``answer``
    field holds the number (checked by easyppo/configs/demo_rewards.py). The SFT policy mixes moods at
    random, so it rarely gets it right; reading the number off the prompt is what RL must teach."""
    rows = []
    for _ in range(n):
        thing, count = rng.choice(THINGS), rng.choice((0, 3))  # none or only nice words
        messages = [{"role": "user", "content": COUNTING_PROMPT.format(thing=thing, n=count)}]
        if rng.random() < 0.2:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        rows.append({"messages": messages, "answer": str(count)})
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def train_tokenizer(path: pathlib.Path, texts: list[str]) -> None:
    """A Llama-2-shaped sentencepiece BPE model (byte fallback, <pad> at id 3) of 512 pieces."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=512,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        user_defined_symbols=["<|system|>", "<|user|>", "<|assistant|>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def main() -> None:
    out = pathlib.Path(__file__).resolve().parent.parent / "easyppo" / "configs" / "demo_data"
    out.mkdir(exist_ok=True)
    rng = random.Random(20261125)
    splits = {
        "sft_train.jsonl": sft_rows(rng, 2048),
        "sft_eval.jsonl": sft_rows(rng, 256),
        "preference_train.jsonl": preference_rows(rng, 2048),
        "preference_eval.jsonl": preference_rows(rng, 256),
        "prompts_train.jsonl": prompt_rows(rng, 1024),
        "prompts_eval.jsonl": prompt_rows(rng, 128),
    }
    for name, rows in splits.items():
        write_jsonl(out / name, rows)
    # A stream of its own, so adding the task left every earlier file (and the tokenizer) unchanged.
    counting = random.Random(20261130)
    for name, rows in {
        "counting_train.jsonl": counting_rows(counting, 1024),
        "counting_eval.jsonl": counting_rows(counting, 128),
    }.items():
        write_jsonl(out / name, rows)
    texts = [m["content"] for row in splits["sft_train.jsonl"] for m in row["messages"]]
    train_tokenizer(out / "tokenizer.model", texts)
    print(f"wrote {', '.join(splits)} and tokenizer.model to {out}")


if __name__ == "__main__":
    main()
