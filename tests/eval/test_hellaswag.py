"""HellaSwag scoring: parity with transformers, batching invariance, known answers, bad files."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval import hellaswag as H
from tests.conftest import F32_EPS, ULPS, assert_close_f32, assert_not_close_f32
from tests.eval.conftest import tiny_gpt, unigram_gpt


def _transformers_scores(hf, tokenizer, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean loss of every candidate: a few lines over transformers' own forward, in float64."""
    sums, means = [], []
    for ex in examples:
        ctx = tokenizer.encode_ordinary(ex.ctx)
        for ending in ex.endings:
            end = tokenizer.encode_ordinary(" " + ending)
            tokens = torch.tensor([ctx + end])
            with torch.no_grad():
                logp = F.log_softmax(hf(tokens).logits[0, :-1].double(), dim=-1)  # predicts tokens[1:]
            nll = -logp[torch.arange(len(ctx) - 1, tokens.size(1) - 1), torch.tensor(end)]
            sums.append(nll.sum().item())
            means.append(nll.mean().item())
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(means, dtype=torch.float64)


def _gap_of_best_two(loss: torch.Tensor) -> float:
    """The smallest distance, over examples, between the two lowest of their 4 candidates' losses."""
    best_two = loss.view(-1, 4).sort(1).values[:, :2]
    return (best_two[:, 1] - best_two[:, 0]).min().item()


def test_parity_with_transformers(tmp_path, tokenizer, hellaswag_file):
    """Per-candidate losses equal an independent few-line scorer over transformers' own forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab.interop.load import load_model

    torch.manual_seed(0)
    cfg = GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=2, initializer_range=0.2)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))

    examples = H.load_examples(hellaswag_file, 6)
    ours = H.score_examples(model, tokenizer, examples, "cpu", batch_size=3)

    ref_sum, ref_mean = _transformers_scores(hf, tokenizer, examples)

    # float32 logits summed in another order on another CPU: a few roundings of the largest loss (~270)
    assert_close_f32(ours.sum_loss, ref_sum)
    assert_close_f32(ours.mean_loss, ref_mean)
    for ref in (ref_sum, ref_mean):  # the best two candidates lie further apart than the tolerance twice over,
        assert _gap_of_best_two(ref) > 2 * ULPS * F32_EPS * ref.abs().max()  # so the argmins below cannot flip
    assert torch.equal(ours.sum_loss.view(-1, 4).argmin(1), ref_sum.view(-1, 4).argmin(1))
    assert torch.equal(ours.mean_loss.view(-1, 4).argmin(1), ref_mean.view(-1, 4).argmin(1))

    # the check bites: a LayerNorm epsilon 10x off (a port that dropped layer_norm_epsilon) moves them ~500 roundings
    for module in hf.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-4
    assert_not_close_f32(ours.sum_loss, _transformers_scores(hf, tokenizer, examples)[0])


def test_batching_and_padding_change_nothing(tokenizer, hellaswag_file):
    model = tiny_gpt()
    examples = H.load_examples(hellaswag_file, 32)
    one = H.score_examples(model, tokenizer, examples, "cpu", batch_size=1)
    batched = H.score_examples(model, tokenizer, examples, "cpu", batch_size=32)
    assert_close_f32(batched.sum_loss, one.sum_loss)  # other GEMM shapes: other rounding, nothing more
    bumped = one.sum_loss.clone()
    bumped[5] += 1e-2  # the check bites: one candidate off by 1/100 nat is caught
    assert_not_close_f32(batched.sum_loss, bumped)
    assert torch.equal(one.n_tokens, batched.n_tokens)
    for loss in (one.sum_loss, one.mean_loss):  # no near-tie: the accuracies below cannot flip with the rounding
        assert _gap_of_best_two(loss) > 2 * ULPS * F32_EPS * loss.abs().max()
    labels = torch.tensor([ex.label for ex in examples])
    result = H.evaluate_hellaswag(model, tokenizer, examples, "cpu", batch_size=7)  # a ragged last batch
    assert result["count"] == 32
    assert result["correct"] == int((one.sum_loss.view(-1, 4).argmin(1) == labels).sum())
    assert result["correct_norm"] == int((one.mean_loss.view(-1, 4).argmin(1) == labels).sum())


def test_known_answers_acc_and_acc_norm(tokenizer):
    """A model with fixed unigram logits: every candidate's loss and both accuracies are known."""
    good, fine, bad = (tokenizer.encode_ordinary(w)[0] for w in (" good", " fine", " bad"))
    assert tokenizer.encode_ordinary(" good good good bad") == [good, good, good, bad]
    logits = {good: 8.0, fine: 4.0}
    model = unigram_gpt(logits)
    log_z = math.log(50257 - len(logits) + sum(math.exp(v) for v in logits.values()))
    loss = {w: log_z - logits.get(t, 0.0) for w, t in ((" good", good), (" fine", fine), (" bad", bad))}

    # example "tradeoff": "fine" has the lowest sum (1 token), "good good good bad" the lowest mean
    tradeoff = ["fine", "good good good bad", "bad bad", "bad"]
    examples = [
        H.Example("Pick one:", ("good", "bad", "bad bad", "fine bad"), 0),  # both right
        H.Example("Pick one:", tuple(tradeoff), 1),  # acc wrong, acc_norm right
        H.Example("Pick one:", tuple(tradeoff), 1),
        H.Example("Pick one:", tuple(tradeoff), 0),  # acc right, acc_norm wrong
        H.Example("Pick one:", tuple(tradeoff), 3),  # both wrong
    ]
    model.train()
    scores = H.score_examples(model, tokenizer, examples, "cpu", batch_size=2)
    assert model.training  # restored after scoring
    expected_tradeoff = [loss[" fine"], 3 * loss[" good"] + loss[" bad"], 2 * loss[" bad"], loss[" bad"]]
    # up to 4 tokens, each a float32 log-sum-exp of 50257 terms: ~sqrt(50257) roundings of 1 nat each (8x that)
    tolerance = dict(scale=4, terms=50257, ulps=8)
    assert_close_f32(scores.sum_loss.view(5, 4)[1], expected_tradeoff, **tolerance)
    # the check bites: the 47 padded rows of a 50304 vocabulary leaking into the softmax (~1e-3 nat a token)
    leak = math.log(50304 - len(logits) + sum(math.exp(v) for v in logits.values())) - log_z
    leaked = [v + n * leak for v, n in zip(expected_tradeoff, (1, 4, 2, 1))]
    assert_not_close_f32(scores.sum_loss.view(5, 4)[1], leaked, **tolerance)
    assert scores.n_tokens.view(5, 4)[1].tolist() == [1, 4, 2, 1]

    result = H.evaluate_hellaswag(model, tokenizer, examples, "cpu", batch_size=3)
    assert result["count"] == 5
    assert result["acc"] == pytest.approx(2 / 5)  # examples 0 and 3
    assert result["acc_norm"] == pytest.approx(3 / 5)  # examples 0, 1 and 2


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "not valid JSON"),
        ('{"ctx": "a", "label": 0, "endings": ["x", "y", "z"]}', "'endings'"),
        ('{"ctx": "a", "label": 7, "endings": ["w", "x", "y", "z"]}', "'label'"),
        ('{"label": 1, "endings": ["w", "x", "y", "z"]}', "'ctx'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, problem):
    good = json.dumps({"ctx": "a", "label": 0, "endings": ["w", "x", "y", "z"]})
    path = tmp_path / "hs.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(Gpt2LabError, match=rf"hs\.jsonl, line 2: .*{problem}"):
        H.load_examples(path)


def test_empty_or_missing_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(Gpt2LabError, match=r"empty\.jsonl: empty file"):
        H.load_examples(empty)
    with pytest.raises(Gpt2LabError, match="no such file"):
        H.load_examples(tmp_path / "missing.jsonl")


def test_both_formats_are_accepted_and_named(tmp_path, hellaswag_file):
    official_line = {
        "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
        "source_id": "activitynet~v_-JhWjGDPHMY",
    }  # fmt: skip
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(json.dumps(official_line) + "\n")
    assert H.load_examples(path) == H.load_examples(hellaswag_file, 1)  # same first example in both
    assert "not the official file" in H.describe(path)
    assert "text-derived" in H.describe(hellaswag_file)


def test_locate_prefers_the_cached_official_file(tmp_path, monkeypatch, hellaswag_file):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("GPT2LAB_OFFLINE", "1")
    assert H.locate().resolve() == hellaswag_file.resolve()  # nothing cached, offline: the mirror
    fake = tmp_path / "hellaswag" / H.OFFICIAL_NAME
    fake.parent.mkdir()
    fake.write_text("{}\n")  # wrong sha256: not taken for the official file
    assert H.locate().resolve() == hellaswag_file.resolve()


def test_cli_prints_table_and_writes_json(tiny_checkpoint, tmp_path, capsys, hellaswag_file):
    from gpt2lab.cli.main import main

    out = tmp_path / "r.json"
    code = main(["eval", "hellaswag", "--model", str(tiny_checkpoint), "--data", str(hellaswag_file),
                 "--limit", "4", "--json", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "acc_norm" in printed and "hellaswag_val_from_text.jsonl" in printed
    result = json.loads(out.read_text())["hellaswag"]
    assert result["count"] == 4 and 0 <= result["acc_norm"] <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text("oops\n")
    assert main(["eval", "hellaswag", "--model", str(tiny_checkpoint), "--data", str(bad), "--device", "cpu"]) == 2
    assert "bad.jsonl, line 1" in capsys.readouterr().err
