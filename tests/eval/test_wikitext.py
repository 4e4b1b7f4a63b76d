"""WikiText-2: the detokenizer, the word count, and the sliding-window perplexity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval import wikitext as W
from tests.conftest import assert_close_f32, assert_not_close_f32
from tests.eval.conftest import tiny_gpt

TEXT = (
    "Robert is an English film , television and theatre actor . He had a guest @-@ starring role in 2000 . "
    'In 2004 he landed a role as " Craig " in the episode " Teddy \'s Story " ( 1 @,@ 000 viewers ) .'
)


def test_detokenize():
    assert W.detokenize(" " + TEXT + " ") == (
        "Robert is an English film, television and theatre actor. He had a guest-starring role in 2000. "
        'In 2004 he landed a role as "Craig" in the episode "Teddy\'s Story" (1,000 viewers).'
    )
    assert W.detokenize(" = = Career = = ") == "== Career =="
    assert W.detokenize(" = = = 2000 – 2005 = = = ") == "=== 2000 – 2005 ==="
    assert W.detokenize(" it was 3 @.@ 5 m ; the players ' union don 't ! ") == (
        "it was 3.5 m; the players' union don't!"
    )


def test_word_count_of_the_test_file_is_the_published_one(shared_data):
    lines = W.read_lines(shared_data / "wikitext2" / "wiki.test.tokens")
    assert W.word_count(lines) == 245_569  # WikiText-2 test: whitespace tokens + one <eos> per line


def _full_context_nll(model, ids, eot):
    """Independent: one forward over <|endoftext|> + ids with the model's own loss."""
    x = torch.tensor([[eot] + ids[:-1]])
    y = torch.tensor([ids])
    with torch.no_grad():
        _, loss = model(x, y)
    return loss.item() * len(ids)


def _sliding_reference(model, ids, eot, context, stride):
    """Independent: the Hugging Face perplexity guide's loop (labels -100 except the new tokens)."""
    seq = torch.tensor([eot] + ids)
    nll, prev_end = 0.0, 0
    for begin in range(0, len(seq) - 1, stride):
        end = min(begin + context, len(seq) - 1)  # inputs seq[begin:end], targets seq[begin+1:end+1]
        new = end - max(prev_end, begin)
        with torch.no_grad():
            logits, _ = model(seq[begin:end][None])
        logp = F.log_softmax(logits[0, -new:].double(), -1)
        nll -= logp[torch.arange(new), seq[end - new + 1 : end + 1]].sum().item()
        prev_end = end
        if end == len(seq) - 1:
            break
    return nll


def test_sliding_window_equals_full_context_when_text_fits(tokenizer):
    model = tiny_gpt(block_size=128)
    ids = tokenizer.encode_ordinary(W.detokenize(TEXT))
    assert len(ids) < 128
    full = _full_context_nll(model, ids, tokenizer.eot)
    for stride in (16, 64, 128):
        r = W.evaluate_ids(model, ids, tokenizer.eot, "cpu", context=128, stride=stride)
        assert r["tokens"] == len(ids)
        assert_close_f32(r["nll"], full)


@pytest.mark.parametrize("context, stride", [(32, 8), (32, 32), (48, 20)])
def test_sliding_window_scores_each_token_once_like_the_reference(tokenizer, context, stride):
    model = tiny_gpt(block_size=128)
    ids = tokenizer.encode_ordinary(W.detokenize(TEXT)) * 2
    r = W.evaluate_ids(model, ids, tokenizer.eot, "cpu", context=context, stride=stride, batch_size=3)
    assert r["tokens"] == len(ids)
    assert_close_f32(r["nll"], _sliding_reference(model, ids, tokenizer.eot, context, stride))
    if context < len(ids):  # windows shorter than the text: less context, a different number (the check bites)
        assert_not_close_f32(r["nll"], _full_context_nll(model, ids, tokenizer.eot))


def test_bad_settings_and_files(tmp_path, tokenizer):
    model = tiny_gpt(block_size=64)
    with pytest.raises(Gpt2LabError, match="stride"):
        W.windows([1, 2, 3], tokenizer.eot, context=8, stride=0)
    with pytest.raises(Gpt2LabError, match="exceeds the model's block size"):
        W.evaluate_ids(model, [1, 2, 3], tokenizer.eot, "cpu", context=128)
    empty = tmp_path / "wiki.test.tokens"
    empty.write_text(" \n \n")
    with pytest.raises(Gpt2LabError, match=r"wiki\.test\.tokens: empty file"):
        W.read_lines(empty)


def test_cli_reports_both_perplexities_and_the_stride(tiny_checkpoint, capsys):
    from gpt2lab.cli.main import main

    assert main(["eval", "wikitext2", "--model", str(tiny_checkpoint), "--limit", "6", "--stride", "64",
                 "--device", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "stride 64" in out and "ppl (per word)" in out and "per BPE token" in out


def test_a_stride_longer_than_the_window_is_lowered_with_a_notice(tiny_checkpoint, capsys):
    """A 128-token model cannot step 512 tokens: the command says it uses 128, once, on stderr."""
    from gpt2lab.cli.main import main

    argv = ["eval", "wikitext2", "--model", str(tiny_checkpoint), "--limit", "3", "--device", "cpu"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "stride 128" in out  # the table's title
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    assert notices == ["notice: stride 512 is longer than the 128-token window; using stride 128"]
    assert main([*argv, "--stride", "64"]) == 0
    assert "notice" not in capsys.readouterr().err
