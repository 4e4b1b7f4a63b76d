"""Synthetic arithmetic: addition / multiplication ("What is 347 + 829?") with a difficulty knob.

``Arith`` draws problems of ``digits``-digit operands and operators from ``ops``; train and test never share a
problem, whatever the seed (``in_test_split``); ``worked_solution`` writes the column-by-column reasoning used as
the thinking span in SFT, and ``write_arith_conversations`` is ``gpt2lab data arith``.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.errors import Gpt2LabError
from gpt2lab.rl.scoring import NumberTask, Problem, check_format_reward, check_split, take

ARITH_SIZES = {"train": 10_000, "test": 500}
ARITH_OPS = "+*"
ARITH_DIGITS = 2  # digits per operand unless told: gpt2lab data arith, eval arith and rl.digits all start here


def in_test_split(a: int, op: str, b: int) -> bool:
    """Whether a problem belongs to arith's test split: a fixed tenth of all problems, by a hash of the problem
    (not of the seed), so no seed's train problems meet any seed's test problems."""
    return zlib.crc32(f"{a}{op}{b}".encode()) % 10 == 0


def _digits(n: int) -> list[int]:
    """The decimal digits of n >= 0, least significant first."""
    return [int(c) for c in reversed(str(n))]


def addition_steps(a: int, b: int) -> str:
    """Column addition, right to left, one line per column with its carry; each line needs only the column's
    two digits (from the spelled-out first line) and the previous line's carry.

    347 + 829 ->
        3 4 7 + 8 2 9
        7 + 9 + 0 = 16, digit 6, carry 1
        4 + 2 + 1 = 7, digit 7, carry 0
        3 + 8 + 0 = 11, digit 1, carry 1
        digits 1 1 7 6
    """
    da, db = _digits(a), _digits(b)
    lines = [f"{' '.join(str(a))} + {' '.join(str(b))}"]
    carry, out = 0, []
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        lines.append(f"{x} + {y} + {carry} = {s}, digit {s % 10}, carry {s // 10}")
        out.append(s % 10)
        carry = s // 10
    if carry:
        out.append(carry)
    lines.append("digits " + " ".join(str(d) for d in reversed(out)))
    return "\n".join(lines)


def multiplication_steps(a: int, b: int) -> str:
    """Long multiplication: a times each digit of b (right to left), shifted, then the partial products summed.

    347 * 29 ->
        347 * 9 = 3123
        347 * 2 = 694, shifted 6940
        3123 + 6940 = 10063
    """
    lines, partials = [], []
    for i, d in enumerate(_digits(b)):
        p = a * d
        lines.append(f"{a} * {d} = {p}" + (f", shifted {p * 10**i}" if i else ""))
        partials.append(p * 10**i)
    total = partials[0]
    for p in partials[1:]:
        lines.append(f"{total} + {p} = {total + p}")
        total += p
    return "\n".join(lines)


def worked_solution(problem: Problem) -> str:
    """The step-by-step reasoning of an arith problem (the thinking span of its SFT conversation)."""
    a, op, b = problem.meta["a"], problem.meta["op"], problem.meta["b"]
    return addition_steps(a, b) if op == "+" else multiplication_steps(a, b)


@dataclass
class Arith(NumberTask):
    """'What is A op B?' with A and B of ``digits`` digits (0-9 for one digit) and op drawn from ``ops``.

    Deterministic per (seed, split, digits, ops). The test split holds each problem once (fewer than asked
    when the test tenth of a small space runs out); the train split draws with repetition, an endless stream.
    """

    digits: int = ARITH_DIGITS
    ops: str = "+"
    seed: int = 0
    format_reward: float = 0.0
    name = "arith"

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 18:
            raise Gpt2LabError(f"arith digits must be in 1..18 (got {self.digits})")
        if not self.ops or set(self.ops) - set(ARITH_OPS):
            raise Gpt2LabError(f"arith ops must be one or more of {ARITH_OPS} (got {self.ops!r})")
        self.format_reward = check_format_reward(self.format_reward)

    def problem(self, a: int, op: str, b: int) -> Problem:
        result = a + b if op == "+" else a * b
        user = {"role": "user", "content": f"What is {a} {op} {b}?"}
        p = Problem([user], str(result), f"arith/{a}{op}{b}", meta={"a": a, "op": op, "b": b})
        p.solution = worked_solution(p)
        return p

    def problems(self, split: str = "test", n: int | None = None) -> list[Problem]:
        check_split(split)
        n = ARITH_SIZES[split] if n is None else n
        take([], n)
        rng = random.Random(f"arith:{self.seed}:{split}:{self.digits}:{sorted(self.ops)}")
        lo, hi = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        out, seen, test = [], set(), split == "test"
        for _ in range(100 * n + 1000):  # bounded: a small space's test tenth runs out
            if len(out) == n:
                break
            a, op, b = rng.randint(lo, hi), rng.choice(sorted(self.ops)), rng.randint(lo, hi)
            if in_test_split(a, op, b) != test or (test and (a, op, b) in seen):
                continue
            seen.add((a, op, b))
            out.append(self.problem(a, op, b))
        if n and not out:
            raise Gpt2LabError(f"arith with {self.digits} digits and ops {self.ops!r} has no {split} problems")
        return out

    def conversations(
        self, n: int, split: str = "train", thinking: float = 0.0, tool: bool = False
    ) -> list[list[dict]]:
        """SFT conversations: the question, and the number as the answer, after the worked solution as
        reasoning_content in a ``thinking`` share of them (True or 1: all; spread evenly through the list).

        tool: the answer is worked out by the calculator first, in GSM8K's form: ``<<347*286=99242>>99242``
        (rendered as a call by SFT's sft.calculator = "tool"; the answer read is the last number, the same).
        """
        out = []
        for i, p in enumerate(self.problems(split, n)):
            meta = p.meta
            answer = f"<<{meta['a']}{meta['op']}{meta['b']}={p.answer}>>{p.answer}" if tool else p.answer
            reply = {"role": "assistant", "content": answer}
            if math.floor((i + 1) * thinking) > math.floor(i * thinking):
                reply = {"role": "assistant", "reasoning_content": p.solution, "content": answer}
            out.append([*p.messages, reply])
        return out


def write_arith_conversations(
    out: str | Path, n: int, digits: int, ops: str, thinking: float, tool: bool = False
) -> int:
    """`gpt2lab data arith`: n train-split conversations as OpenAI fine-tuning JSONL, for gpt2lab sft; a
    ``thinking`` share of them (0 to 1) reasons first; ``tool``: the answers call the calculator (train them
    with sft.calculator = tool)."""
    if n < 1:
        raise Gpt2LabError(f"--n must be >= 1 (got {n})")
    if not 0 <= thinking <= 1:
        raise Gpt2LabError(f"--thinking takes the share of conversations that reason first, 0 to 1 (got {thinking})")
    conversations = Arith(digits=digits, ops=ops).conversations(n, "train", thinking, tool)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    reasoned = sum("reasoning_content" in c[-1] for c in conversations)
    calls = ", answers through the calculator" if tool else ""
    print(f"wrote {len(conversations)} conversations ({digits}-digit {ops}, {reasoned} with thinking{calls}) to {path}")
    return 0
