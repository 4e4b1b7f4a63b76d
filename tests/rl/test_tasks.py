"""The RL tasks: GSM8K's verifier and its parity on the reference solutions, arith's splits and worked solutions,
a user's JSONL task, and get_task."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest

from gpt2lab.errors import Gpt2LabError
from gpt2lab.rl.arith import Arith
from gpt2lab.rl.gsm8k import GSM8K, gsm8k_messages, load_gsm8k
from gpt2lab.rl.scoring import Problem
from gpt2lab.rl.tasks import get_task


def problem(answer: str) -> Problem:
    return Problem([{"role": "user", "content": "?"}], answer)


@pytest.mark.parametrize(
    "reply, answer, reward",
    [
        ("1,234", "1234", 1.0),
        ("$18", "18", 1.0),
        ("18.0", "18", 1.0),
        ("-3", "-3", 1.0),
        ("3", "-3", 0.0),
        ("3.50", "3.5", 1.0),
        ("3.5", "35", 0.0),
        ("18 dollars", "18", 1.0),
        ("The answer is 18.", "18", 1.0),
        ("16 - 3 = 13", "13", 1.0),
        ("16-3", "-3", 0.0),  # a minus between numbers is subtraction, not a sign
        ("x = -3", "-3", 1.0),
        ("She pays $1,080.00 in all.\n#### 1,080", "1080", 1.0),
        ("#### 18\nand then 5", "18", 1.0),
        ("17 ducks\n#### 18", "17", 0.0),  # the #### answer counts, not an earlier number
        ("reasoning 7</think> 42", "42", 1.0),
        ("<think>it is 42 but I never finish", "42", 0.0),  # a thinking span never closed states no answer
        ("abc", "18", 0.0),
        ("", "18", 0.0),
        ("####", "18", 0.0),
        ("1e3", "1000", 0.0),
    ],
)
def test_gsm8k_verifier(reply, answer, reward):
    assert GSM8K().reward(reply, problem(answer)) == reward


def test_a_malformed_reply_scores_zero_and_never_raises():
    task = GSM8K()
    for reply in (None, 42, "\x00\ufffd<<>>", "9" * 5000 + "x", "-", "$", ",", ".", "1,,2", "<|assistant_end|>"):
        assert task.reward(reply, problem("7")) == 0.0
    assert task.check("9" * 5000, problem("9" * 5000)) == ("9" * 5000, True)


def test_format_reward_pays_a_parsed_wrong_answer_only():
    task = GSM8K(format_reward=0.1)
    assert [task.reward(r, problem("18")) for r in ("18", "17", "none")] == [1.0, 0.1, 0.0]
    with pytest.raises(Gpt2LabError, match="format_reward"):
        GSM8K(format_reward=1.0)


def _reference(solution: str) -> Decimal:
    """An independent reading of a GSM8K reference: the text after ####, commas dropped."""
    return Decimal(solution.split("####")[-1].strip().replace(",", ""))


def test_gsm8k_parity_every_reference_solution_of_the_first_200_test_items_scores_right():
    task = GSM8K()
    problems = task.problems("test", 200)
    records = task.records("test")[:200]
    assert len(problems) == 200
    for p, r in zip(problems, records):
        assert Decimal(p.answer) == _reference(r["answer"])
        assert task.reward(r["answer"], p) == 1.0, p.id
        for thinking in (False, True):  # both SFT targets score right too
            reply = gsm8k_messages(r, thinking)[-1]["content"]
            assert task.reward(reply, p) == 1.0, (p.id, thinking)
        wrong = r["answer"].rsplit("####", 1)[0] + f"#### {_reference(r['answer']) + 1}"
        assert task.reward(wrong, p) == 0.0, p.id


def test_gsm8k_messages_thinking_and_calculator():
    record = load_gsm8k("test")[0]
    think = gsm8k_messages(record, thinking=True)
    assert think[0] == {"role": "user", "content": record["question"]}
    assert think[1]["content"] == "18" and "####" not in think[1]["reasoning_content"]
    assert "<<" not in think[1]["reasoning_content"] and "9 * 2 = $18" in think[1]["reasoning_content"]
    keep = gsm8k_messages(record, thinking=False, calculator="keep")[1]
    assert keep["content"] == record["answer"] and "reasoning_content" not in keep
    assert "<<9*2=18>>" not in gsm8k_messages(record)[1]["content"]
    with pytest.raises(Gpt2LabError, match="calculator"):
        gsm8k_messages(record, calculator="python")


def test_gsm8k_without_data_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_MIRROR", str(tmp_path))  # a mirror without gsm8k/; the hub is offline in tests
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(Gpt2LabError, match="no GSM8K test split"):
        GSM8K().problems("test")
    with pytest.raises(Gpt2LabError, match="no such GSM8K file"):
        GSM8K(data=tmp_path / "missing").problems("test")


# ----------------------------------------------------------------------------- arith

_PROMPT = re.compile(r"What is (\d+) ([+*]) (\d+)\?")


def test_arith_is_deterministic_and_its_answers_are_right():
    task = Arith(digits=3, ops="+*", seed=1)
    first = task.problems("test", 50)
    assert [p.id for p in first] == [p.id for p in Arith(digits=3, ops="+*", seed=1).problems("test", 50)]
    assert [p.id for p in first] != [p.id for p in Arith(digits=3, ops="+*", seed=2).problems("test", 50)]
    assert [p.id for p in task.problems("test", 20)] == [p.id for p in first[:20]]  # a limit is a prefix
    for p in first:
        a, op, b = _PROMPT.fullmatch(p.messages[-1]["content"]).groups()
        assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    assert {p.meta["op"] for p in first} == {"+", "*"}


def test_arith_train_and_test_never_share_a_problem_whatever_the_seed():
    test = {p.id for p in Arith(digits=2, seed=0).problems("test")}
    assert len(test) == len(Arith(digits=2, seed=0).problems("test"))  # each test problem once
    for seed in (0, 1):
        train = {p.id for p in Arith(digits=2, seed=seed).problems("train", 5000)}
        assert len(train) > 1000 and not train & test
    assert len(Arith(digits=1).problems("test")) < 500  # a small space's test tenth runs out


def check_addition(solution: str, a: int, b: int) -> int:
    """Read a column addition back, checking every step; return the number its last line spells."""
    lines = solution.split("\n")
    assert lines[0] == f"{' '.join(str(a))} + {' '.join(str(b))}"
    da, db = str(a)[::-1], str(b)[::-1]
    carry = 0
    for i, line in enumerate(lines[1:-1]):
        step = re.fullmatch(r"(\d) \+ (\d) \+ (\d) = (\d+), digit (\d), carry (\d)", line)
        x, y, c, s, digit, out = map(int, step.groups())
        assert (x, y, c) == (int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0, carry)
        assert s == x + y + c and digit == s % 10 and out == s // 10
        carry = out
    assert lines[-1].startswith("digits ")
    return int(lines[-1][len("digits ") :].replace(" ", ""))


def check_multiplication(solution: str, a: int, b: int) -> int:
    """Read a long multiplication back, checking every product and sum; return its last result."""
    total = None
    for i, line in enumerate(solution.split("\n")):
        if m := re.fullmatch(r"(\d+) \* (\d)( = (\d+))(, shifted (\d+))?", line):
            x, d, p, shifted = int(m[1]), int(m[2]), int(m[4]), m[6]
            assert x == a and d == int(str(b)[::-1][i]) and p == a * d
            assert int(shifted or p) == p * 10**i
            total = p if total is None else total
        else:
            u, v, w = map(int, re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", line).groups())
            assert u == total and w == u + v
            total = w
    return total


@pytest.mark.parametrize("digits, ops", [(1, "+"), (3, "+"), (5, "+"), (2, "*"), (3, "*")])
def test_worked_solutions_are_correct_arithmetic(digits, ops):
    for p in Arith(digits=digits, ops=ops).problems("test", 40):
        a, b = p.meta["a"], p.meta["b"]
        check = check_addition if ops == "+" else check_multiplication
        assert check(p.solution, a, b) == int(p.answer), p.solution


def test_a_wrong_step_is_caught_by_the_checks():
    p = Arith(digits=3).problems("test", 1)[0]
    a, b = p.meta["a"], p.meta["b"]
    lines = p.solution.split("\n")
    lines[1] = re.sub(r"= (\d+)", lambda m: f"= {int(m[1]) + 1}", lines[1])
    with pytest.raises(AssertionError):
        check_addition("\n".join(lines), a, b)


def test_arith_conversations_round_trip_through_the_chat_template(tokenizer):
    from gpt2lab.chat.template import render, split_reply

    task = Arith(digits=3)
    with_thinking = task.conversations(3, "train", thinking=True)
    direct = task.conversations(3, "train", thinking=False)
    problems = task.problems("train", 3)
    for conv, plain, p in zip(with_thinking, direct, problems):
        assert conv[-1] == {"role": "assistant", "reasoning_content": p.solution, "content": p.answer}
        assert plain[-1] == {"role": "assistant", "content": p.answer}
        ids, mask = render(conv, tokenizer)
        reply = [i for i, m in zip(ids, mask) if m]
        assert split_reply(reply, tokenizer) == (p.solution, p.answer)
        assert task.reward(split_reply(reply, tokenizer)[1], p) == 1.0


@pytest.mark.parametrize("flag, reasoned", [(["--thinking", "0.25"], 5), (["--thinking"], 20), ([], 0)])
def test_gpt2lab_data_arith_writes_a_share_of_the_conversations_with_thinking(tmp_path, capsys, flag, reasoned):
    """--thinking 0.25: every fourth conversation reasons first (spread through the file), the rest answer."""
    from gpt2lab.cli.main import main

    out = tmp_path / "arith.jsonl"
    assert main(["data", "arith", "--out", str(out), "--n", "20", *flag]) == 0
    replies = [json.loads(line)["messages"][-1] for line in out.read_text().splitlines()]
    thinks = ["reasoning_content" in r for r in replies]
    assert sum(thinks) == reasoned and f"{reasoned} with thinking" in capsys.readouterr().out
    if reasoned == 5:
        assert [i for i, t in enumerate(thinks) if t] == [3, 7, 11, 15, 19]
    assert main(["data", "arith", "--out", str(out), "--thinking", "1.5"]) != 0
    assert "0 to 1" in capsys.readouterr().err


def test_arith_refuses_bad_settings():
    for kwargs, field in (({"digits": 0}, "digits"), ({"ops": "-"}, "ops"), ({"ops": ""}, "ops")):
        with pytest.raises(Gpt2LabError, match=field):
            Arith(**kwargs)
    with pytest.raises(Gpt2LabError, match="split"):
        Arith().problems("val")


# ----------------------------------------------------------------------------- a user's JSONL, get_task


def test_jsonl_task_exact_match_and_messages(tmp_path):
    path = tmp_path / "tasks.jsonl"
    rows = [{"prompt": "Capital of France?", "answer": "Paris"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
             "answer": 4}]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = get_task(str(path))
    p1, p2 = task.problems("test")
    assert p1.messages == [{"role": "user", "content": "Capital of France?"}] and p2.answer == "4"
    assert [task.reward(r, p1) for r in (" Paris\n", "paris", "Paris.", "")] == [1.0, 0.0, 0.0, 0.0]
    assert task.reward("4", p2) == 1.0


def test_jsonl_task_with_a_verifier_function(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"prompt": "Name a prime above 10.", "answer": "10"}) + "\n")
    verifier = tmp_path / "check.py"
    verifier.write_text(
        "def above(text, ref):\n    n = int(text)\n    return n > int(ref) and all(n % d for d in range(2, n))"
    )
    task = get_task(str(path), verifier=f"{verifier}:above")
    p = task.problems("train")[0]
    assert [task.reward(r, p) for r in ("11", "12", "7")] == [1.0, 0.0, 0.0]
    with pytest.warns(UserWarning, match="ValueError"):
        assert task.reward("eleven", p) == 0.0  # the function raised: 0, not a crash
    assert get_task(str(path), verifier="operator:ne").reward("3", p) == 1.0  # a module:function path: "3" != "10"
    with pytest.raises(Gpt2LabError, match="has no function"):
        get_task(str(path), verifier=f"{verifier}:missing")
    with pytest.raises(Gpt2LabError, match="module:function"):
        get_task(str(path), verifier="no_colon")


def test_jsonl_task_bad_record_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(Gpt2LabError, match="line 2"):
        get_task(str(path)).problems("test")


def test_get_task_names_and_options():
    assert isinstance(get_task("arith", digits=2, ops=None), Arith) and get_task("arith", digits=2).digits == 2
    with pytest.raises(Gpt2LabError, match="unknown task"):
        get_task("mmlu")
    with pytest.raises(Gpt2LabError, match="takes no option digits"):
        get_task("gsm8k", digits=3)
