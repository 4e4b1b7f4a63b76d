"""The calculator tool: arithmetic as Python computes it, GSM8K's own annotations, hostile input refused fast,
and the output the engine forces after a call."""

from __future__ import annotations

import json
import random
import time
from fractions import Fraction

import pytest

from gpt2lab.inference.tools import TOOL_CALL, TOOL_ERROR, Calculator, calculate, split_calls
from gpt2lab.tokenizer.bpe import get_tokenizer
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def random_expression(rng: random.Random, depth: int = 0) -> str:
    """A random expression of small ints and decimals with + - * / and parentheses (// % ** on small ints)."""
    if depth >= 3 or rng.random() < 0.3:
        if rng.random() < 0.3:
            return f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}"
        return str(rng.randint(0, 999))
    kind = rng.random()
    if kind < 0.1:
        return f"{rng.randint(1, 99)} {rng.choice(['//', '%'])} {rng.randint(1, 20)}"
    if kind < 0.15:
        return f"{rng.randint(0, 9)}**{rng.randint(0, 5)}"
    if kind < 0.2:
        return f"-({random_expression(rng, depth + 1)})"
    op = rng.choice(["+", "-", "*", "/"])
    return f"({random_expression(rng, depth + 1)} {op} {random_expression(rng, depth + 1)})"


def test_random_expressions_evaluate_as_python_does():
    rng = random.Random(0)
    checked = refused = 0
    for _ in range(2000):
        expr = random_expression(rng)
        try:
            expected = eval(expr)  # trusted: built above from digits and operators
        except ZeroDivisionError:
            assert calculate(expr) is None, expr
            refused += 1
            continue
        got = calculate(expr)
        assert got is not None, expr
        # Python computes in floats, the calculator exactly, then rounds to 6 decimals
        assert abs(float(got) - expected) <= 5e-7 + 1e-9 * abs(expected), (expr, got, expected)
        checked += 1
    assert checked > 1500 and refused > 0


@pytest.mark.parametrize(
    "expression, result",
    [
        ("48/2", "24"),  # integral results print as ints
        ("0.2*50", "10"),  # exact: float gives 10.000000000000002
        ("12/60", "0.2"),
        ("1/3", "0.333333"),
        ("2/3", "0.666667"),
        ("-5/2", "-2.5"),
        ("1,200 * 3", "3600"),  # GSM8K's forms: commas, spaces, a trailing "="
        ("48 / 2 =", "24"),
        ("(3+4)*.5", "3.5"),
        ("05+1", "6"),
        ("2**10", "1024"),
        ("2**-3", "0.125"),
        ("16**0.5", "4"),
        ("7//2", "3"),
        ("10%3", "1"),
        ("-0.0000001", "0"),
        ("(" * 100 + "1" + ")" * 100, "1"),  # deep, but within the length bound
        ("-" * 255 + "1", "-1"),
    ],
)
def test_results_are_formatted_as_the_engine_forces_them(expression, result):
    assert calculate(expression) == result


def test_gsm8k_annotations_evaluate_to_their_results():
    """Every <<expr=result>> in the first 500 GSM8K train records. Measured: 1,639 of 1,639 agree exactly (and
    23,716 of 23,716 in the whole train split); a few GSM8K solutions are wrong, but not their calculator calls."""
    lines = (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:500]
    calls = [c for line in lines for c in TOOL_CALL.findall(json.loads(line)["answer"])]
    agree = sum(calculate(e) is not None and Fraction(calculate(e)) == Fraction(r) for e, r in calls)
    print(f"GSM8K annotations: {agree} of {len(calls)} agree")
    assert len(calls) > 1000 and agree / len(calls) >= 0.99


@pytest.mark.parametrize(
    "hostile",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "9**9**9",
        "10**100000",
        "2**-100000",
        "(10**300)**(10**300)",
        "1" * 10000,
        "1e99999999",
        "1e-99999999",
        "(" * 300 + "1" + ")" * 300,
        "-" * 1000 + "1",
        "x",
        "x + 1",
        "(1).real",
        "lambda: 1",
        "[1, 2]",
        "'a' * 3",
        "1j",
        "True + 1",
        "1 if 1 else 2",
        "1 < 2",
        "abs(-1)",
        "1/0",
        "1 % 0",
        "0**-1",
        "(-8)**(1/3)",
        "10**31",
        "1,2",
        "",
        "=",
        "1\x00",
    ],
)
def test_hostile_or_bad_input_is_refused_quickly(hostile):
    start = time.perf_counter()
    assert calculate(hostile) is None
    assert time.perf_counter() - start < 0.5


def test_split_calls_cuts_text_at_its_annotations():
    text = "Half is 48/2 = <<48/2=24>>24. Then <<24*2=48>>"
    assert split_calls(text) == ["Half is 48/2 = ", ("48/2", "24"), "24. Then ", ("24*2", "48")]
    assert split_calls("no calls <<here>>") == ["no calls <<here>>"]
    assert split_calls("") == []


def test_forced_answers_a_closed_call_and_nothing_else(tok):
    calc = Calculator(tok)
    start, end = tok.special_id("<|tool_start|>"), tok.special_id("<|tool_end|>")
    out = [tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")]
    text = tok.encode_ordinary("Natalia sold 48/2 = ")
    call = [*text, start, *tok.encode_ordinary("48/2"), end]
    assert calc.forced(call) == [out[0], *tok.encode_ordinary("24"), out[1]]
    assert calc.forced(call[:-1]) == []  # not at <|tool_end|> yet
    assert calc.forced([]) == [] and calc.forced(text) == []
    assert calc.forced([*text, end]) == []  # a <|tool_end|> that opened nothing
    answered = [*call, *calc.forced(call)] + tok.encode_ordinary("24 clips. ")
    assert calc.forced([*answered, end]) == []  # the latest call was closed already
    second = [*answered, start, *tok.encode_ordinary("48+24"), end]
    assert calc.forced(second) == [out[0], *tok.encode_ordinary("72"), out[1]]
    bad = [start, *tok.encode_ordinary("__import__('os')"), end]
    assert calc.forced(bad) == [out[0], *tok.encode_ordinary(TOOL_ERROR), out[1]]
    assert calc.forced([start, end]) == [out[0], *tok.encode_ordinary(TOOL_ERROR), out[1]]
