"""The verifiable reward of the demo's counting task: a user reward function, as a user writes one.

Each prompt asks for a description of a thing "with N nice words" (N is 0 or 3); the row's
``answer`` is N. A
response is correct when it describes the thing in the demo's frame ("The fox is A, B and C.") and
exactly N of the three words are from the cheerful list (the words the demo's SFT policy already
uses, in every mix). The frame matters: without it, dropping words would be an easy way to "use
zero nice words". The SFT policy ignores N and mixes moods at random;
GRPO has to learn to read N. Named in a config as
``grpo.rewards="easyppo.configs.demo_rewards:nice_word_count"``.
"""

from __future__ import annotations

import re

CHEERFUL = ("bright", "kind", "lovely", "cheerful", "gentle", "warm", "merry", "friendly", "sunny", "graceful")
_FRAME = re.compile(r"^\s*The [a-z]+ is ([a-z]+), ([a-z]+) and ([a-z]+)\.")


def cheerful_words(response: str) -> int | None:
    """How many of the three describing words are cheerful; None when the response leaves the frame."""
    match = _FRAME.match(response)
    return None if match is None else sum(word in CHEERFUL for word in match.groups())


def nice_word_count(responses: list[str], answers: list[str | None], prompts: list[str]) -> list[float]:
    """1.0 where the response keeps the frame and uses exactly ``answer`` cheerful words, else 0.0."""
    del prompts
    return [float(answer is not None and cheerful_words(r) == int(answer)) for r, answer in zip(responses, answers)]
