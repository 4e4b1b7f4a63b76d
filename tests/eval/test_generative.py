"""`gpt2lab eval gsm8k|arith`: pass@k, and end to end on a model whose replies are scripted by position."""

from __future__ import annotations

import json
import math
from decimal import Decimal, InvalidOperation

import pytest
import torch
from torch import nn

from gpt2lab.chat.base import CHAT_VOCAB_SIZE
from gpt2lab.chat.template import render_plain_prompt, render_prompt
from gpt2lab.cli.main import main
from gpt2lab.eval.generative import evaluate, pass_at_k, pass_ks
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.rl.gsm8k import GSM8K
from gpt2lab.rl.scoring import Problem
from tests.eval.conftest import silence_blocks

LOGIT = 25.0  # a scripted token's logit: e^25 outweighs the ~50k others at logit ~0, so sampling draws it too


def test_pass_at_k_equals_the_hand_computation():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw of 3 holds a right one
    for n, c, k in [(8, 1, 4), (10, 3, 5), (16, 5, 8), (200, 7, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    assert pass_ks(1) == [1] and pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def scripted_model(script: dict[int, dict[int, float]]) -> GPT:
    """A chat-vocabulary GPT whose logits at position p are ``script[p]`` ({token: logit}), ~0 for other tokens,
    whatever the input (blocks silenced, token embedding zeroed, position embedding the identity, as
    ``positional_gpt``): LayerNorm(e_p) is ~7.94 at p, so head row t holds logit / 7.94 in column p."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=CHAT_VOCAB_SIZE, padded_vocab_size=50304, n_layer=2, n_head=2,
                       n_embd=64)  # fmt: skip
    model = GPT(config)
    with torch.no_grad():
        silence_blocks(model)
        model.transformer.wte = nn.Embedding(config.padded_vocab_size, 64)  # untied from the head
        nn.init.zeros_(model.transformer.wte.weight)
        model.transformer.wpe.weight.copy_(torch.eye(64))
        model.lm_head.weight.zero_()
        scale = (1 - 1 / 64) / math.sqrt((1 / 64) * (1 - 1 / 64))
        for pos, logits in script.items():
            for token, logit in logits.items():
                model.lm_head.weight[token, pos] = logit / scale
    return model.eval()


class Listed(GSM8K):
    """GSM8K's verifier over given problems."""

    def __init__(self, problems: list[Problem]):
        super().__init__()
        self.given = problems

    def problems(self, split="test", n=None):
        return self.given[:n]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def independent_correct(answer: str, reference: str) -> bool:
    try:
        return Decimal(answer.strip()) == Decimal(reference)
    except InvalidOperation:
        return False


@pytest.fixture
def scripted(tokenizer):
    """Four same-length prompts whose reply is "<think> 7</think> 42" (greedy; sampled: 42 or 41) and a longer
    one whose reply falls past the script: "!" repeated (token 0, the argmax of all-equal logits)."""
    problems = [Problem(user(f"Q{i}"), a) for i, a in enumerate(["42", "41", "42.0", "7"])]
    problems.append(Problem(user("Q5 is a question of many more tokens"), "42"))
    L = len(render_prompt(problems[0].messages, tokenizer))
    assert {len(render_prompt(p.messages, tokenizer)) for p in problems[:4]} == {L}
    assert len(render_prompt(problems[4].messages, tokenizer)) >= L + 4
    (seven,), (t42,), (t41,) = (tokenizer.encode_ordinary(s) for s in (" 7", " 42", " 41"))
    s = tokenizer.special_id
    # the logits at position p give the token at p + 1: the reply starts at the prompt's last position, L - 1
    script = {L - 1: {s("<think>"): LOGIT}, L: {seven: LOGIT}, L + 1: {s("</think>"): LOGIT},
              L + 2: {t42: LOGIT, t41: LOGIT - math.log(1.5)}, L + 3: {s("<|assistant_end|>"): LOGIT}}  # fmt: skip
    return scripted_model(script), Listed(problems)


def test_eval_counts_are_what_the_scripted_replies_imply(tokenizer, scripted):
    model, task = scripted
    r = evaluate(model, tokenizer, task, samples=8, temperature=1.0, max_new_tokens=8, details=True)
    # greedy: problems 0 and 2 (42, 42.0) right; problem 4's "!!!!!!!!" states no number
    assert (r["count"], r["correct"], r["pass@1"], r["format_rate"]) == (5, 2, 2 / 5, 4 / 5)
    assert r["reply_tokens"] == (4 * 4 + 8) / 5 and r["think_tokens"] == 4 / 5
    greedy = [row["greedy"] for row in r["details"]]
    assert [(g.reasoning, g.answer) for g in greedy[:4]] == [(" 7", " 42")] * 4 and greedy[4].answer == "!" * 8
    # sampled: recount from the replies with an independent scorer and the pass@k formula
    expect = {k: 0.0 for k in (1, 2, 4, 8)}
    drawn = set()
    for row, p in zip(r["details"], task.given):
        answers = [s.answer for s in row["samples"]]
        if row["index"] < 4:
            assert set(answers) <= {" 42", " 41"} and {s.reasoning for s in row["samples"]} == {" 7"}
            drawn |= set(answers)
        c = sum(independent_correct(a, p.answer) for a in answers)
        for k in expect:
            expect[k] += (1 - math.comb(8 - c, k) / math.comb(8, k)) / 5
    assert drawn == {" 42", " 41"}  # both answers were sampled: pass@k is not trivially 0 or 1
    assert r["sampled_pass@1"] == pytest.approx(expect[1]) and 0 < expect[1] < expect[8] < 1
    assert [r["pass@2"], r["pass@4"], r["pass@8"]] == pytest.approx([expect[2], expect[4], expect[8]])
    assert r["sampled_think_tokens"] == pytest.approx(4 * 8 / 40)


def test_ranks_split_the_problems_and_the_counts_add_up(tokenizer, scripted):
    model, task = scripted
    whole = evaluate(model, tokenizer, task, max_new_tokens=6)
    parts = [evaluate(model, tokenizer, task, max_new_tokens=6, rank=r, world_size=2) for r in (0, 1)]
    assert [p["count"] for p in parts] == [3, 2]
    assert sum(p["correct"] for p in parts) == whole["correct"] == 2


def test_a_base_model_is_asked_in_the_plain_transcript_and_stops_at_the_next_user_turn(tokenizer):
    problem = Problem(user("What is 40 + 2?"), "42")
    L = len(render_plain_prompt(problem.messages, tokenizer))
    reply = tokenizer.encode_ordinary(" 42\nUser: and 7?")  # the base model goes on to write the next turn
    model = scripted_model({L - 1 + i: {t: LOGIT} for i, t in enumerate(reply)})
    r = evaluate(model, tokenizer, Listed([problem]), chat=False, max_new_tokens=12, details=True)
    assert r["details"][0]["greedy"].answer == " 42" and r["correct"] == 1 and r["prompt_format"] == "plain"
    assert r["reply_tokens"] == 1


def test_the_command_writes_json_and_a_missing_dataset_is_one_error_line(tmp_path, capsys):
    from gpt2lab.checkpoint.folder import save_model

    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=CHAT_VOCAB_SIZE, padded_vocab_size=50304, n_layer=2, n_head=2,
                       n_embd=32)  # fmt: skip
    ckpt = save_model(GPT(config).eval(), tmp_path / "tiny")
    out = tmp_path / "r.json"
    args = ["eval", "arith", "--model", str(ckpt), "--limit", "3", "--max-new-tokens", "4", "--digits", "2"]
    assert main([*args, "--samples", "2", "--prompt-format", "chat", "--json", str(out), "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert (results["count"], results["samples"], results["task"]) == (3, 2, "arith") and "pass@2" in results
    capsys.readouterr()
    assert main([*args, "--json", "--device", "cpu"]) == 0  # no PATH: the JSON on stdout, not a table
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :])["prompt_format"] == "plain"  # a base model, by its config
    config = json.loads((ckpt / "config.json").read_text())
    config["train_state"] = {"config": {"rl": {"task": "arith"}}}  # as a gpt2lab rl run records it: a chat policy
    (ckpt / "config.json").write_text(json.dumps(config))
    assert main([*args, "--json", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :])["prompt_format"] == "chat"
    assert main(["eval", "gsm8k", "--model", str(ckpt), "--data", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none" in err[0]


def test_a_reply_never_runs_past_the_models_context(tokenizer, scripted):
    """Problem 4's reply never ends: by default it stops where the 64-token context is full, not 256 tokens
    later through the sliding window; a larger explicit value is cut there too, and counted."""
    model, task = scripted
    room = 64 - len(render_prompt(task.given[4].messages, tokenizer))
    r = evaluate(model, tokenizer, task, details=True)
    assert r["details"][4]["greedy"].reply_tokens == room and "capped_replies" not in r
    r = evaluate(model, tokenizer, task, max_new_tokens=1000, details=True)
    assert r["details"][4]["greedy"].reply_tokens == room and r["capped_replies"] == 5
    r = evaluate(model, tokenizer, task, max_new_tokens=6, details=True)
    assert r["details"][4]["greedy"].reply_tokens == 6 and r["capped_replies"] == 0


def test_the_command_says_once_that_an_explicit_max_new_tokens_was_capped(tmp_path, capsys):
    from gpt2lab.checkpoint.folder import save_model

    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=CHAT_VOCAB_SIZE, padded_vocab_size=50304, n_layer=1, n_head=2,
                       n_embd=16)  # fmt: skip
    ckpt = save_model(GPT(config).eval(), tmp_path / "tiny")
    args = ["eval", "arith", "--model", str(ckpt), "--limit", "3", "--prompt-format", "chat", "--device", "cpu"]
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out[out.index("{") :])["reply_tokens"] < 32 and "max-new-tokens" not in err
    assert main([*args, "--json", "--max-new-tokens", "1000"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "--max-new-tokens" in line]
    assert len(notes) == 1 and "1000" in notes[0] and "32-token context" in notes[0], notes


def test_arith_digits_have_one_default_in_data_eval_and_rl():
    from gpt2lab.cli.main import build_parser
    from gpt2lab.rl.arith import Arith
    from gpt2lab.rl.rollout import RLConfig

    parser = build_parser()
    defaults = {
        "gpt2lab data arith": parser.parse_args(["data", "arith", "--out", "x.jsonl"]).digits,
        "gpt2lab eval arith": parser.parse_args(["eval", "arith", "--model", "m"]).digits,
        "rl.digits": RLConfig().digits,
        "Arith()": Arith().digits,
    }
    assert set(defaults.values()) == {2}, defaults
    from gpt2lab.rl.arith import ARITH_DIGITS  # the one place it is defined

    assert ARITH_DIGITS == 2
