"""One rule for a reply's thinking span, on ids (split_reply) and on text (the tasks' final_text)."""

from __future__ import annotations

import re

import pytest

from gpt2lab.chat.template import split_reply
from gpt2lab.rl.gsm8k import GSM8K
from gpt2lab.rl.scoring import Problem, final_text
from gpt2lab.tokenizer.bpe import get_tokenizer

# (reply with its special tokens as text, its reasoning, the answer it states, its reward when the reference is 42)
CASES = [
    ("42", None, "42", 1.0),
    ("<think>six sevens</think>42", "six sevens", "42", 1.0),
    ("It is <think>six sevens</think> 42", "six sevens", "It is  42", 1.0),  # the text outside the span
    ("six sevens</think>42", "six sevens", "42", 1.0),  # a </think> alone closes a span the prompt opened
    ("<think>it is 42 but I never finish", "it is 42 but I never finish", "", 0.0),  # never closed: no answer
    ("42 <think>or is it 41", "or is it 41", "", 0.0),  # ... even with text before it: cut off mid-thought
    ("42<|assistant_end|><think>junk", None, "42", 1.0),  # the reply ends at <|assistant_end|>
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _ids(text: str, tok) -> list[int]:
    pieces = re.split(r"(<think>|</think>|<\|assistant_end\|>)", text)
    return [i for p in pieces if p for i in ([tok.special_id(p)] if p.startswith("<") else tok.encode_ordinary(p))]


@pytest.mark.parametrize("reply, reasoning, answer, reward", CASES)
def test_split_reply_and_the_tasks_read_the_same_answer_and_reward(tok, reply, reasoning, answer, reward):
    text = reply.split("<|assistant_end|>")[0]  # a whole decoded reply, as the tasks may be given it
    assert split_reply(_ids(reply, tok), tok) == (reasoning, answer)
    assert final_text(text) == answer
    task, problem = GSM8K(), Problem([{"role": "user", "content": "?"}], "42")
    assert task.reward(answer, problem) == task.reward(text, problem) == reward
