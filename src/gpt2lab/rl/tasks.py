"""Tasks with verifiable answers: the questions a model is asked, and a program that scores its reply.

A task is a small class with
- ``problems(split, n=None) -> list[Problem]``: each question as OpenAI chat messages ending with the user turn,
  and its reference answer in canonical form;
- ``parse(answer_text) -> str | None``: the final answer a reply states, canonical; None when it states none;
- ``check(reply_text, problem) -> (parsed, correct)`` and ``reward(reply_text, problem) -> float``: 1.0 when the
  stated answer is the reference, else 0.0 (``format_reward`` instead, when it parses but is wrong; 0 by default,
  so the reward is exactly "right or not"). A malformed reply scores 0; scoring never raises.
``reply_text`` is the answer of a reply (``gpt2lab.chat.template.split_reply``'s second value); a whole decoded
reply works too: the text after ``</think>`` is scored, and a thinking span never closed states no answer.

Built in:
- ``gsm8k``: grade-school math word problems (Cobbe et al. 2021), 7,473 train and 1,319 test. The reference is
  the number after ``####`` in the worked solution. A reply's answer is the number after its last ``####`` if it
  writes one (the format of GSM8K's solutions), else the last number in it; numbers compare exactly as decimals,
  so "1,234", "$18", "18.0", "18 dollars", "The answer is 18." and "-3" all read as the numbers they write.
- ``arith``: synthetic addition / multiplication ("What is 347 + 829?") with a difficulty knob (operand digits,
  operators); train and test never share a problem, whatever the seed; ``worked_solution`` writes the
  column-by-column reasoning used as the thinking span in SFT.
- a user's JSONL of ``{"prompt" | "messages", "answer"}``: exact match of the stripped answer text, or a Python
  function ``module:function`` (or ``path/file.py:function``) called as ``f(answer_text, reference) -> float``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import random
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpt2lab.errors import Gpt2LabError

SPLITS = ("train", "test")
CALCULATOR = ("strip", "keep")  # GSM8K's <<48/2=24>> annotations in SFT data: removed, or left in the text


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
_NUMBER = re.compile(r"(-)?\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


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
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    before = text[match.start() - 1] if match.start() > 0 else " "
    negative = match.group(1) is not None and not (before.isalnum() or before in ")]_")
    return canonical_number(("-" if negative else "") + match.group(2))


def final_text(reply_text: str) -> str:
    """The answer part of a reply: after ``</think>``; nothing when a thinking span is never closed."""
    if "</think>" in reply_text:
        return reply_text.rsplit("</think>", 1)[1]
    return "" if "<think>" in reply_text else reply_text


def strip_calculator(text: str) -> str:
    """GSM8K's text without its calculator annotations: '24/2=<<24/2=12>>12' -> '24/2=12'."""
    return _CALCULATOR.sub("", text)


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


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise Gpt2LabError(f"split must be train or test (got {split!r})")


def _check_format_reward(value: float) -> float:
    if not 0 <= value < 1:
        raise Gpt2LabError(
            f"format_reward must be in [0, 1) (got {value}): a wrong answer must score below a right one"
        )
    return float(value)


def _take(items: list, n: int | None) -> list:
    if n is not None and n < 0:
        raise Gpt2LabError(f"the number of problems must be >= 0 (got {n})")
    return items if n is None else items[:n]


# ----------------------------------------------------------------------------- GSM8K

GSM8K_HUB = ("openai/gsm8k", "main")


def parse_gsm8k(answer_text: str) -> str | None:
    """The final answer a GSM8K reply states: the first number after its last ####, else its last number."""
    text = strip_calculator(answer_text)
    if "####" in text:
        after = text.rsplit("####", 1)[1]
        first = _NUMBER.search(after.replace("\u2212", "-"))
        return last_number(after[: first.end()]) if first else None
    return last_number(text)


def gsm8k_messages(record: dict, thinking: bool = False, calculator: str = "strip") -> list[dict]:
    """A GSM8K record as an SFT conversation.

    thinking: the worked solution (its #### line removed) is the assistant's ``reasoning_content`` and the
    number alone its content. Without: the content is the whole worked solution, #### line kept, as GSM8K
    writes it: the line states the final answer unambiguously, and ``parse_gsm8k`` reads it first (without it,
    the last number is read, and 2.7% of GSM8K's solutions do not end with their answer: 7,264 of 7,473 train and
    1,283 of 1,319 test do).
    calculator: "strip" removes the <<48/2=24>> annotations (the result written after them stays), "keep"
    leaves them in the text.
    """
    if calculator not in CALCULATOR:
        raise Gpt2LabError(f"calculator must be strip or keep (got {calculator!r})")
    solution = record["answer"] if calculator == "keep" else strip_calculator(record["answer"])
    user = {"role": "user", "content": record["question"]}
    if not thinking:
        return [user, {"role": "assistant", "content": solution}]
    work, _, final = solution.rpartition("####")
    answer = canonical_number(final) or final.strip()
    return [user, {"role": "assistant", "reasoning_content": work.strip(), "content": answer}]


def load_gsm8k(split: str, data: str | Path | None = None) -> list[dict]:
    """GSM8K's records ({question, answer}) of a split: from ``data`` (a folder holding SPLIT.jsonl, or one file),
    else the mirror's gsm8k/SPLIT.jsonl, else the hub's openai/gsm8k (main)."""
    from gpt2lab.mirror import mirror_file

    _check_split(split)
    if data is not None:
        path = Path(data) / f"{split}.jsonl" if Path(data).is_dir() else Path(data)
        if not path.is_file():
            raise Gpt2LabError(f"{path}: no such GSM8K file")
    else:
        path = mirror_file(f"gsm8k/{split}.jsonl")
    if path is not None:
        return _read_gsm8k(path)
    try:
        import datasets

        rows = datasets.load_dataset(*GSM8K_HUB, split=split)
        return [{"question": r["question"], "answer": r["answer"]} for r in rows]
    except Exception as e:  # offline, no hub access: one clear message
        raise Gpt2LabError(
            f"no GSM8K {split} split: set GPT2LAB_MIRROR to a folder holding gsm8k/{split}.jsonl, pass its "
            f"folder as data, or go online ({'/'.join(GSM8K_HUB)} from the hub failed: {e})"
        ) from e


def _read_gsm8k(path: Path) -> list[dict]:
    from gpt2lab.data.sources import iter_jsonl

    records = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row.get("question"), str) or "####" not in str(row.get("answer", "")):
            raise Gpt2LabError(f"{path}, line {lineno}: a GSM8K record needs a question and an answer with ####")
        records.append(row)
    if not records:
        raise Gpt2LabError(f"{path}: empty file, no problems")
    return records


class GSM8K(NumberTask):
    """GSM8K: the question as the user turn; the reference is the number after #### in its solution."""

    name = "gsm8k"

    def __init__(self, data: str | Path | None = None, format_reward: float = 0.0):
        self.data = data
        self.format_reward = _check_format_reward(format_reward)
        self._records: dict[str, list[dict]] = {}

    def records(self, split: str) -> list[dict]:
        if split not in self._records:
            self._records[split] = load_gsm8k(split, self.data)
        return self._records[split]

    def problems(self, split: str = "test", n: int | None = None) -> list[Problem]:
        out = []
        for i, r in enumerate(_take(self.records(split), n)):
            answer = parse_gsm8k(r["answer"].rsplit("####", 1)[1])
            user = {"role": "user", "content": r["question"]}
            out.append(Problem([user], answer or "", f"gsm8k/{split}/{i}", r["answer"]))
        return out

    def parse(self, answer_text: str) -> str | None:
        return parse_gsm8k(answer_text)


# ----------------------------------------------------------------------------- synthetic arithmetic

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
        self.format_reward = _check_format_reward(self.format_reward)

    def problem(self, a: int, op: str, b: int) -> Problem:
        result = a + b if op == "+" else a * b
        user = {"role": "user", "content": f"What is {a} {op} {b}?"}
        p = Problem([user], str(result), f"arith/{a}{op}{b}", meta={"a": a, "op": op, "b": b})
        p.solution = worked_solution(p)
        return p

    def problems(self, split: str = "test", n: int | None = None) -> list[Problem]:
        _check_split(split)
        n = ARITH_SIZES[split] if n is None else n
        _take([], n)
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

    def conversations(self, n: int, split: str = "train", thinking: float = 0.0) -> list[list[dict]]:
        """SFT conversations: the question, and the number as the answer, after the worked solution as
        reasoning_content in a ``thinking`` share of them (True or 1: all; spread evenly through the list)."""
        out = []
        for i, p in enumerate(self.problems(split, n)):
            reply = {"role": "assistant", "content": p.answer}
            if math.floor((i + 1) * thinking) > math.floor(i * thinking):
                reply = {"role": "assistant", "reasoning_content": p.solution, "content": p.answer}
            out.append([*p.messages, reply])
        return out


def write_arith_conversations(out: str | Path, n: int, digits: int, ops: str, thinking: float) -> int:
    """`gpt2lab data arith`: n train-split conversations as OpenAI fine-tuning JSONL, for gpt2lab sft; a
    ``thinking`` share of them (0 to 1) reasons first."""
    if n < 1:
        raise Gpt2LabError(f"--n must be >= 1 (got {n})")
    if not 0 <= thinking <= 1:
        raise Gpt2LabError(f"--thinking takes the share of conversations that reason first, 0 to 1 (got {thinking})")
    conversations = Arith(digits=digits, ops=ops).conversations(n, "train", thinking)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    reasoned = sum("reasoning_content" in c[-1] for c in conversations)
    print(f"wrote {len(conversations)} conversations ({digits}-digit {ops}, {reasoned} with thinking) to {path}")
    return 0


# ----------------------------------------------------------------------------- a user's JSONL


def load_verifier(spec: str) -> Callable:
    """The function of 'module:function' or 'path/to/file.py:function', imported (never eval'd)."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise Gpt2LabError(f"verifier {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise Gpt2LabError(f"verifier {spec}: {where}: no such file")
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Gpt2LabError:
        raise
    except Exception as e:
        raise Gpt2LabError(f"verifier {spec}: importing {where} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise Gpt2LabError(f"verifier {spec}: {where} has no function {name}")
    return fn


class JsonlTask(Task):
    """A user's problems: JSON lines of ``{"prompt": str | "messages": [...], "answer": ...}``.

    ``path`` is one file (every split reads it) or a folder holding train.jsonl and test.jsonl. Without a
    verifier an answer is right when its stripped text equals the reference's; a verifier is called as
    ``f(answer_text, reference) -> float | bool``, and an exception in it scores 0 (warned once).
    """

    name = "jsonl"

    def __init__(self, path: str | Path, verifier: str | None = None, format_reward: float = 0.0):
        self.path = Path(path)
        if not self.path.exists():
            raise Gpt2LabError(f"{self.path}: no such task file or folder")
        self.verifier = load_verifier(verifier) if verifier else None
        self.format_reward = _check_format_reward(format_reward)
        self._warned = False

    def file(self, split: str) -> Path:
        _check_split(split)
        path = self.path / f"{split}.jsonl" if self.path.is_dir() else self.path
        if not path.is_file():
            raise Gpt2LabError(f"{path}: no such file (a task folder holds train.jsonl and test.jsonl)")
        return path

    def problems(self, split: str = "test", n: int | None = None) -> list[Problem]:
        from gpt2lab.chat.template import check_conversation
        from gpt2lab.data.sources import iter_jsonl

        path, out = self.file(split), []
        for lineno, row in iter_jsonl(path):
            if n is not None and len(out) >= n:
                break
            where = f"{path}, line {lineno}"
            if "answer" not in row or not ("prompt" in row or "messages" in row):
                raise Gpt2LabError(f"{where}: a task record needs an answer and a prompt or messages")
            messages = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
            try:
                check_conversation(messages, generation=True)
            except Gpt2LabError as e:
                raise Gpt2LabError(f"{where}: {e}") from None
            out.append(Problem(list(messages), str(row["answer"]).strip(), f"{path.name}/{lineno}"))
        if not out:
            raise Gpt2LabError(f"{path}: no problems")
        return out

    def parse(self, answer_text: str) -> str | None:
        return answer_text.strip() or None

    def check(self, reply_text: str, problem: Problem) -> tuple[str | None, bool]:
        if self.verifier is None:
            return super().check(reply_text, problem)
        parsed, score = self._verify(reply_text, problem)
        return parsed, score >= 1.0

    def reward(self, reply_text: str, problem: Problem) -> float:
        """Without a verifier: as every task; with one: its value, clipped to [0, 1] (partial credit allowed)."""
        if self.verifier is None:
            return super().reward(reply_text, problem)
        parsed, score = self._verify(reply_text, problem)
        return 0.0 if parsed is None else score if score > 0 else self.format_reward

    def _verify(self, reply_text: str, problem: Problem) -> tuple[str | None, float]:
        parsed = self.parse(final_text(reply_text)) if isinstance(reply_text, str) else None
        if parsed is None:
            return None, 0.0
        try:
            score = float(self.verifier(parsed, problem.answer))
        except Exception as e:  # the model's text broke the user's function: that reply scores 0
            if not self._warned:
                warnings.warn(f"the verifier raised {type(e).__name__}: {e}; such replies score 0", stacklevel=3)
                self._warned = True
            return parsed, 0.0
        return parsed, min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0


# ----------------------------------------------------------------------------- by name

TASKS = {"gsm8k": GSM8K, "arith": Arith}


def get_task(name_or_path: str, **options) -> Task:
    """A task by name (gsm8k, arith) or a JSONL path; options set to None are left at their defaults."""
    options = {k: v for k, v in options.items() if v is not None}
    if name_or_path in TASKS:
        cls = TASKS[name_or_path]
    elif name_or_path.endswith(".jsonl") or Path(name_or_path).exists():
        cls, options = JsonlTask, {"path": name_or_path, **options}
    else:
        raise Gpt2LabError(f"unknown task {name_or_path!r}: gsm8k, arith, or a JSONL file of prompts and answers")
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise Gpt2LabError(f"task {cls.name} takes no option {', '.join(unknown)} (it takes {', '.join(accepted)})")
    return cls(**options)
