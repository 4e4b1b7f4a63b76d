"""GSM8K: grade-school math word problems (Cobbe et al. 2021), 7,473 train and 1,319 test.

The reference is the number after ``####`` in the worked solution. A reply's answer is the number after its last
``####`` if it writes one (the format of GSM8K's solutions), else the last number in it; numbers compare exactly as
decimals, so "1,234", "$18", "18.0", "18 dollars", "The answer is 18." and "-3" all read as the numbers they write.
The records come from a folder or file, the mirror's gsm8k/SPLIT.jsonl, or the hub; ``gsm8k_messages`` makes
one an SFT conversation.
"""

from __future__ import annotations

import re
from pathlib import Path

from gpt2lab.errors import Gpt2LabError
from gpt2lab.rl.scoring import (
    NUMBER,
    NumberTask,
    Problem,
    canonical_number,
    check_format_reward,
    check_split,
    last_number,
    take,
)

GSM8K_HUB = ("openai/gsm8k", "main")
# GSM8K's <<48/2=24>> annotations in SFT data: removed, left in the text, or kept for rendering as calculator
# calls ("tool": the text keeps them; gpt2lab.chat.template.render(tools=True) turns them into tool tokens)
CALCULATOR = ("strip", "keep", "tool")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def strip_calculator(text: str) -> str:
    """GSM8K's text without its calculator annotations: '24/2=<<24/2=12>>12' -> '24/2=12'."""
    return _CALCULATOR.sub("", text)


def parse_gsm8k(answer_text: str) -> str | None:
    """The final answer a GSM8K reply states: the first number after its last ####, else its last number."""
    text = strip_calculator(answer_text)
    if "####" in text:
        after = text.rsplit("####", 1)[1]
        first = NUMBER.search(after.replace("\u2212", "-"))
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
    leaves them in the text, "tool" too: the messages are the same as with "keep", and SFT renders them with
    ``tools`` (each annotation a calculator call whose output is not trained).
    """
    if calculator not in CALCULATOR:
        raise Gpt2LabError(f"calculator must be one of {', '.join(CALCULATOR)} (got {calculator!r})")
    solution = strip_calculator(record["answer"]) if calculator == "strip" else record["answer"]
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

    check_split(split)
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
        self.format_reward = check_format_reward(format_reward)
        self._records: dict[str, list[dict]] = {}

    def records(self, split: str) -> list[dict]:
        if split not in self._records:
            self._records[split] = load_gsm8k(split, self.data)
        return self._records[split]

    def problems(self, split: str = "test", n: int | None = None) -> list[Problem]:
        out = []
        for i, r in enumerate(take(self.records(split), n)):
            answer = parse_gsm8k(r["answer"].rsplit("####", 1)[1])
            user = {"role": "user", "content": r["question"]}
            out.append(Problem([user], answer or "", f"gsm8k/{split}/{i}", r["answer"]))
        return out

    def parse(self, answer_text: str) -> str | None:
        return parse_gsm8k(answer_text)
