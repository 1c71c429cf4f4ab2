"""The built-in reward functions: each scores decoded responses against the rows' ground truth.

All return 1.0 for a correct response and 0.0 otherwise (the ``format`` reward: pattern found or
not), so their means are accuracies. A row without an answer scores 0 under the answer-checking
rewards; the run config refuses such a combination up front where it can.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

RewardFn = Callable[[list[str], list["str | None"], list[str]], Sequence[float]]

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*(.+)", re.IGNORECASE)


def final_answer(response: str) -> str:
    """The part of a response that states its answer: the last ``\\boxed{...}``, else what follows the
    last "answer is" / "answer:", else the last non-empty line."""
    boxed = _BOXED.findall(response)
    if boxed:
        return boxed[-1]
    stated = _ANSWER_IS.findall(response)
    if stated:
        return stated[-1]
    lines = [line for line in response.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalise(text: str) -> str:
    """Case, surrounding whitespace and punctuation, ``$`` and repeated spaces do not count."""
    text = text.strip().strip("$").strip().rstrip(".!").strip().lower()
    return " ".join(text.split())


def exact_match(responses: list[str], answers: list[str | None], prompts: list[str]) -> list[float]:
    """1 when the response's final answer equals the ground truth after :func:`normalise`."""
    del prompts
    return [float(a is not None and normalise(final_answer(r)) == normalise(a)) for r, a in zip(responses, answers)]


def parse_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric(tolerance: float) -> RewardFn:
    """1 when the last number of the response's final answer is within ``tolerance`` (relative, with an
    absolute floor of the same size) of the ground truth's number."""

    def score(responses: list[str], answers: list[str | None], prompts: list[str]) -> list[float]:
        del prompts
        out = []
        for response, answer in zip(responses, answers):
            want = parse_number(answer) if answer is not None else None
            got = parse_number(final_answer(response))
            ok = want is not None and got is not None and math.isclose(got, want, rel_tol=tolerance, abs_tol=tolerance)
            out.append(float(ok))
        return out

    return score


def math_verify(responses: list[str], answers: list[str | None], prompts: list[str]) -> list[float]:
    """Mathematical equivalence (``1/2`` = ``0.5`` = ``\\frac{1}{2}``) by Hugging Face's ``math-verify``
    checker (the optional ``math`` extra)."""
    del prompts
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("the 'math_verify' reward needs the math-verify package: pip install 'easyppo[math]'") from e
    out = []
    for response, answer in zip(responses, answers):
        if answer is None:
            out.append(0.0)
            continue
        gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
        out.append(float(bool(gold) and verify(gold, parse(response))))
    return out


def format_match(pattern: str) -> RewardFn:
    """1 when ``pattern`` (a regular expression) is found in the response (``re.search``, DOTALL)."""
    compiled = re.compile(pattern, re.DOTALL)

    def score(responses: list[str], answers: list[str | None], prompts: list[str]) -> list[float]:
        del answers, prompts
        return [float(compiled.search(r) is not None) for r in responses]

    return score


#: Whether each built-in compares with the rows' ``answer`` (a prompt set without answers cannot use it).
NEEDS_ANSWER = {"exact_match": True, "numeric": True, "math_verify": True, "format": False}
BUILTIN = tuple(NEEDS_ANSWER)
