"""LAMBADA: the whole last word must be predicted greedily; its perplexity per word."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval import lambada as L
from tests.conftest import assert_close_f32, assert_not_close_f32
from tests.eval.conftest import positional_gpt, tiny_gpt

SHORT = ("The answer is", " Harlin")  # target splits into [" Har", "lin"]
LONG = ("A much longer context goes right here", " signs")  # one-token target


def _reference(model, tokenizer, passages):
    """Independent few lines: full forward, log-softmax, the target's NLL and whether argmax got every token."""
    nll, right = [], []
    for ctx, word in passages:
        c, w = tokenizer.encode_ordinary(ctx), tokenizer.encode_ordinary(word)
        with torch.no_grad():
            logits, _ = model(torch.tensor([c + w]))
        pred = logits[0, len(c) - 1 : -1]  # (len(w), V): the positions that predict w
        nll.append(-F.log_softmax(pred.double(), -1)[torch.arange(len(w)), torch.tensor(w)].sum().item())
        right.append(pred.argmax(-1).tolist() == w)
    return nll, right


@pytest.fixture
def tokens(tokenizer):
    har, lin = tokenizer.encode_ordinary(SHORT[1])
    (signs,) = tokenizer.encode_ordinary(LONG[1])
    c_short, c_long = (len(tokenizer.encode_ordinary(p[0])) for p in (SHORT, LONG))
    assert c_long - 1 not in (c_short - 1, c_short)  # the positions predicting the two targets differ
    other = tokenizer.encode_ordinary(" lol")[0]
    return dict(har=har, lin=lin, signs=signs, other=other, c_short=c_short, c_long=c_long)


@pytest.mark.parametrize(
    "case, expected_short",
    [("both tokens right", True), ("first right, second wrong", False), ("first wrong, second right", False)],
)
def test_multi_token_word_needs_every_token(tokenizer, tokens, case, expected_short):
    t = tokens
    first = t["other"] if case.startswith("first wrong") else t["har"]
    second = t["lin"] if case != "first right, second wrong" else t["other"]
    model = positional_gpt({t["c_short"] - 1: first, t["c_short"]: second, t["c_long"] - 1: t["signs"]})
    passages = [SHORT, LONG]
    scores = L.score_passages(model, tokenizer, passages, "cpu", batch_size=2)
    assert scores.greedy.tolist() == [expected_short, True]
    assert scores.n_tokens.tolist() == [2, 1]

    ref_nll, ref_right = _reference(model, tokenizer, passages)
    assert ref_right == [expected_short, True]
    logit = 79.0  # the losses are differences of logits this large (~0 when right), so they round like 79
    assert_close_f32(scores.sum_loss, ref_nll, scale=logit)
    assert_not_close_f32(scores.sum_loss, [v + 1e-3 for v in ref_nll], scale=logit)  # 1/1000 nat is caught
    assert (scores.sum_loss[0] < 1e-3) == expected_short  # a wrong token costs ~79 nats here

    result = L.evaluate_lambada(model, tokenizer, passages, "cpu", batch_size=1)
    assert result["count"] == 2 and result["correct"] == 1 + expected_short
    assert_close_f32(math.log(result["ppl"]), sum(ref_nll) / 2, scale=logit)  # per word
    assert_close_f32(math.log(result["ppl_token"]), sum(ref_nll) / 3, scale=logit)  # per BPE token


def test_random_model_matches_reference_on_real_passages(tokenizer, lambada_file):
    model = tiny_gpt()
    passages = L.load_passages(lambada_file, 6)
    assert all(word.startswith(" ") and " " not in word[1:] for _, word in passages)
    scores = L.score_passages(model, tokenizer, passages, "cpu", batch_size=4)
    ref_nll, ref_right = _reference(model, tokenizer, passages)
    assert_close_f32(scores.sum_loss, ref_nll)
    assert scores.greedy.tolist() == ref_right


def test_split_last_word():
    assert L.split_last_word('He said "no" to Harlin\n') == ('He said "no" to', " Harlin")
    with pytest.raises(ValueError):
        L.split_last_word("single")


def test_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / "lam.jsonl"
    path.write_text(json.dumps({"text": "fine text here"}) + "\n" + json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(Gpt2LabError, match=r"lam\.jsonl, line 2: .*'text'"):
        L.load_passages(path)
    path.write_text(json.dumps({"text": "oneword"}) + "\n")
    with pytest.raises(Gpt2LabError, match=r"lam\.jsonl, line 1: no context"):
        L.load_passages(path)
    path.write_text("")
    with pytest.raises(Gpt2LabError, match=r"lam\.jsonl: empty file"):
        L.load_passages(path)
