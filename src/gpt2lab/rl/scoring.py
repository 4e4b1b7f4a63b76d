"""Scoring a reply: the ``Problem`` a model is asked, the ``Task`` interface every task implements, and the
reading of the answer a reply states.

A task is a small class with
- ``problems(split, n=None) -> list[Problem]``: each question as OpenAI chat messages ending with the user turn,
  and its reference answer in canonical form;
- ``parse(answer_text) -> str | None``: the final answer a reply states, canonical; None when it states none;
- ``check(reply_text, problem) -> (parsed, correct)`` and ``reward(reply_text, problem) -> float``: 1.0 when the
  stated answer is the reference, else 0.0 (``format_reward`` instead, when it parses but is wrong; 0 by default,
  so the reward is exactly "right or not"). A malformed reply scores 0; scoring never raises.
``reply_text`` is the answer of a reply (``gpt2lab.chat.template.split_reply``'s second value); a whole decoded
reply works too: the text outside its thinking span is scored, and a thinking span never closed states no answer
(even with text before it), the rule ``split_reply`` applies to ids.

The tasks themselves: ``gsm8k.py``, ``arith.py``, and ``tasks.py`` (a user's JSONL, and every task by name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gpt2lab.errors import Gpt2LabError

SPLITS = ("train", "test")


@dataclass
class Problem:
    """One question: ``messages`` end with the user turn; ``answer`` is the reference in canonical form."""

    messages: list[dict]
    answer: str
    id: str = ""
    solution: str = ""  # a reference worked solution, where the task has one
    meta: dict = field(default_factory=dict)  # task-specific facts (arith: the operands)


# ----------------------------------------------------------------------------- reading numbers

# A number as people write it: thousands commas ("1,234"), decimals ("3.50", ".5"), a dollar sign, a minus.
NUMBER = re.compile(r"(-)?\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def canonical_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '18.0' -> '18', '-3' -> '-3'; None when text is not a plain number."""
    text = text.strip().replace(",", "").lstrip("$")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", text):
        return None
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, frac = body.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")  # exact at any length (Decimal would round)
    if whole == "0" and not frac:
        return "0"
    return sign + whole + ("." + frac if frac else "")


def last_number(text: str) -> str | None:
    """The last number written in text, canonical; a minus counts only as a sign, not in "16-3"."""
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    matches = list(NUMBER.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    before = text[match.start() - 1] if match.start() > 0 else " "
    negative = match.group(1) is not None and not (before.isalnum() or before in ")]_")
    return canonical_number(("-" if negative else "") + match.group(2))


def final_text(reply_text: str) -> str:
    """The answer part of a reply: the text outside its first thinking span (``<think>...</think>``); nothing
    when that span is never closed. The rule of ``gpt2lab.chat.template.split_reply``, on text."""
    start = reply_text.find("<think>")
    if start < 0:  # a </think> alone closes a span the prompt opened
        return reply_text.split("</think>", 1)[-1]
    stop = reply_text.find("</think>", start)
    if stop < 0:
        return ""
    return reply_text[:start] + reply_text[stop + len("</think>") :]


# ----------------------------------------------------------------------------- the task interface


class Task:
    """Problems and a verifier; subclasses give ``problems`` and ``parse``."""

    name = "task"
    format_reward = 0.0  # the reward of an answer that parses but is wrong

    def problems(self, split: str = "test", n: int | None = None) -> list[Problem]:
        raise NotImplementedError

    def parse(self, answer_text: str) -> str | None:
        raise NotImplementedError

    def correct(self, parsed: str, problem: Problem) -> bool:
        return parsed == problem.answer

    def check(self, reply_text: str, problem: Problem) -> tuple[str | None, bool]:
        """(the answer the reply states, canonical, or None; whether it is the reference)."""
        if not isinstance(reply_text, str):
            return None, False
        parsed = self.parse(final_text(reply_text))
        return parsed, parsed is not None and self.correct(parsed, problem)

    def reward(self, reply_text: str, problem: Problem) -> float:
        """1.0 right; ``format_reward`` (default 0) when the answer parses but is wrong; 0.0 otherwise."""
        parsed, right = self.check(reply_text, problem)
        return 1.0 if right else (self.format_reward if parsed is not None else 0.0)


class NumberTask(Task):
    """A task whose answer is a number: compared exactly as decimals ("42.0" is "42", "1,080" is "1080")."""

    def parse(self, answer_text: str) -> str | None:
        return last_number(answer_text)

    def correct(self, parsed: str, problem: Problem) -> bool:
        return parsed == (canonical_number(problem.answer) or problem.answer)


def check_split(split: str) -> None:
    """Refuse a split other than train or test."""
    if split not in SPLITS:
        raise Gpt2LabError(f"split must be train or test (got {split!r})")


def check_format_reward(value: float) -> float:
    """A task's ``format_reward``, checked to be in [0, 1)."""
    if not 0 <= value < 1:
        raise Gpt2LabError(
            f"format_reward must be in [0, 1) (got {value}): a wrong answer must score below a right one"
        )
    return float(value)


def take(items: list, n: int | None) -> list:
    """The first ``n`` problems (None: all of them)."""
    if n is not None and n < 0:
        raise Gpt2LabError(f"the number of problems must be >= 0 (got {n})")
    return items if n is None else items[:n]
