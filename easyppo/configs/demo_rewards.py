"""The verifiable reward of the demo's counting task: a user reward function, as a user writes one.

Each prompt asks for a description of a thing "with N nice words"; the row's ``answer`` is N. A
response is correct when exactly N of its words are from the demo's cheerful list (the words the
demo's SFT policy already uses, in every mix). The SFT policy ignores N, so it is right about a
quarter of the time; GRPO has to learn to read N. Named in a config as
``grpo.rewards="easyppo.configs.demo_rewards:nice_word_count"``.
"""

from __future__ import annotations

import re

CHEERFUL = ("bright", "kind", "lovely", "cheerful", "gentle", "warm", "merry", "friendly", "sunny", "graceful")
_WORD = re.compile(r"[a-z]+")


def cheerful_words(text: str) -> int:
    """How many words of ``text`` are on the cheerful list."""
    return sum(word in CHEERFUL for word in _WORD.findall(text.lower()))


def nice_word_count(responses: list[str], answers: list[str | None], prompts: list[str]) -> list[float]:
    """1.0 where the response uses exactly ``answer`` cheerful words, else 0.0 (batched, host side)."""
    del prompts
    return [float(answer is not None and cheerful_words(r) == int(answer)) for r, answer in zip(responses, answers)]
