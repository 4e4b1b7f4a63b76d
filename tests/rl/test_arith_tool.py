"""Arith with the calculator: answers written as calls (``<<347*286=99242>>99242``), read and scored as before."""

from __future__ import annotations

import json

import pytest

from gpt2lab.chat.template import render, split_reply
from gpt2lab.cli.main import main
from gpt2lab.inference.tools import Calculator, calculate, split_calls
from gpt2lab.rl.arith import Arith
from gpt2lab.rl.gsm8k import GSM8K
from gpt2lab.tokenizer.bpe import get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_tool_answers_call_the_calculator_and_score_as_the_plain_answer():
    task = Arith(digits=3, ops="+*")
    problems = task.problems("train", 50)
    for tool in (False, True):
        convs = task.conversations(50, "train", thinking=0.5, tool=tool)
        for p, conv in zip(problems, convs):
            content = conv[-1]["content"]
            a, op, b = p.meta["a"], p.meta["op"], p.meta["b"]
            assert content == (f"<<{a}{op}{b}={p.answer}>>{p.answer}" if tool else p.answer)
            assert task.check(content, p) == (p.answer, True)  # the reward reads the last number
            assert GSM8K().parse(content) == p.answer
        assert sum("reasoning_content" in c[-1] for c in convs) == 25
    for conv in task.conversations(50, "train", tool=True):
        ((expr, result),) = [c for c in split_calls(conv[-1]["content"]) if isinstance(c, tuple)]
        assert calculate(expr) == result


def test_a_tool_reply_rendered_and_answered_by_the_engine_decodes_and_scores(tok):
    """The model's part of a rendered reply, then what Calculator.forced adds, is the rendered reply again."""
    task = Arith(digits=3, ops="*")
    p = task.problems("test", 1)[0]
    conv = task.conversations(1, "test", tool=True)[0]
    ids, mask = render(conv, tok, tools=True)
    reply = ids[ids.index(tok.special_id("<|assistant_start|>")) + 1 :]
    upto = reply.index(tok.special_id("<|tool_end|>")) + 1
    forced = Calculator(tok).forced(reply[:upto])
    assert reply[upto : upto + len(forced)] == forced and len(forced) > 2
    assert mask[-len(reply) :].count(0) == len(forced)  # exactly the forced tokens are untrained
    reasoning, answer = split_reply(reply, tok)
    assert reasoning is None and answer == conv[-1]["content"] and task.check(answer, p) == (p.answer, True)


def test_gpt2lab_data_arith_writes_tool_answers(tmp_path, capsys):
    out = tmp_path / "arith.jsonl"
    assert main(["data", "arith", "--out", str(out), "--n", "8", "--digits", "2", "--tool"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8 and all(r["messages"][-1]["content"].startswith("<<") for r in records)
    assert "answers through the calculator" in capsys.readouterr().out
    assert main(["data", "arith", "--out", str(out), "--n", "8", "--digits", "2"]) == 0
    assert not any("<<" in line for line in out.read_text().splitlines())
