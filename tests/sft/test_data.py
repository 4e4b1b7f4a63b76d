"""SFT data: readers of every layout, mixture and split, packing with masked targets, the loss over trained tokens."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import pytest
import torch

from gpt2lab.chat.template import render
from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.sft.data import SFTConfig, SFTLoader, mixture, pack, parse_data, read_conversations
from gpt2lab.tokenizer.bpe import get_tokenizer
from gpt2lab.train.objective import MaskedNextToken
from tests.conftest import SHARED_DATA, assert_close_f32
from tests.sft.conftest import MaskedBatches


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _write(path, records, lines=True):
    path.write_text("\n".join(map(json.dumps, records)) if lines else json.dumps(records))
    return path


def test_each_layout_reads_as_messages(tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
        {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
        {"instruction": "Do it", "input": "this", "output": "done"},
        {"instruction": "Answer", "context": "Dolly's context", "response": "r"},
        {"instruction": "I am {{name}}", "input": "", "output": "by {{author}}"},
        {"question": "q?", "answer": "a\n#### 4"},
    ]
    convs = read_conversations(_write(tmp_path / "a.jsonl", records), {"name": "Ada", "author": "Bo"})
    assert convs == [
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        [{"role": "user", "content": "h"}, {"role": "assistant", "content": "g"}],
        [{"role": "user", "content": "Do it\n\nthis"}, {"role": "assistant", "content": "done"}],
        [{"role": "user", "content": "Answer\n\nDolly's context"}, {"role": "assistant", "content": "r"}],
        [{"role": "user", "content": "I am Ada"}, {"role": "assistant", "content": "by Bo"}],
        [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a\n#### 4"}],
    ]
    as_array = _write(tmp_path / "b.json", records, lines=False)
    assert read_conversations(as_array, {"name": "Ada", "author": "Bo"}) == convs
    with pytest.raises(Gpt2LabError, match=r"b.jsonl:2: unknown record layout"):
        read_conversations(_write(tmp_path / "b.jsonl", [records[0], {"prompt": "x"}]))
    with pytest.raises(Gpt2LabError, match="unknown ShareGPT speaker 'bot'"):
        read_conversations(_write(tmp_path / "c.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}]))


@pytest.mark.parametrize(
    "path, count",
    [("alpaca_5000/alpaca_5000.json", 5000), ("conversations/dummy_conversation.json", 500),
     ("identity/identity.json", 91), ("gsm8k/test.jsonl", 1319)],
)  # fmt: skip
def test_the_mirrors_sets_read_and_render(tok, path, count):
    convs = read_conversations(SHARED_DATA / path, {"name": "Ada", "author": "Bo"})
    assert len(convs) == count
    for conv in convs[:50]:
        ids, mask = render(conv, tok)
        assert sum(mask) > 0
    assert not any("{{" in m["content"] for c in convs for m in c)  # identity's placeholders filled


def test_mixture_weights_and_held_out_split(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"question": f"a{i}", "answer": "x"} for i in range(40)])
    b = _write(tmp_path / "b.jsonl", [{"question": f"b{i}", "answer": "y"} for i in range(20)])
    assert parse_data(f"{a}, {b}:0.5") == [(str(a), 1.0), (str(b), 0.5)]
    train, val = mixture(SFTConfig(model="m", data=f"{a}:2,{b}:0.5", val_fraction=0.1), seed=1)
    names = lambda convs, p: [c[0]["content"] for c in convs if c[0]["content"].startswith(p)]  # noqa: E731
    assert len(names(val, "a")) == 4 and len(names(val, "b")) == 2
    assert len(names(train, "a")) == 72 and len(set(names(train, "a"))) == 36  # weight 2: each twice
    assert len(names(train, "b")) == 9 and len(set(names(train, "b"))) == 9  # weight 0.5: a random half
    assert not set(names(train, "")) & set(names(val, ""))
    assert mixture(SFTConfig(model="m", data=f"{a}:2,{b}:0.5", val_fraction=0.1), seed=1) == (train, val)
    with pytest.raises(Gpt2LabError, match="must be > 0"):
        parse_data(f"{a}:0")


def test_packing_masks_targets_outside_the_answers(tok):
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(9)]
    packed = pack(convs, tok, block_size=31)
    assert packed.conversations == 9 and packed.tokens.shape[1] == 32
    x, y, _ = SFTLoader(packed, batch_size=len(packed.tokens), shuffle=False).next_batch()
    assert x.shape == y.shape == (len(packed.tokens), 31)
    trained = [int(t) for t in y.flatten() if t != -1]
    expected = [i for c in convs for i, m in zip(*render(c, tok)) if m]
    assert trained == expected  # every answer token and its <|assistant_end|>, nothing else, in order
    assert torch.equal(torch.from_numpy(packed.tokens[:, 1:].astype("int64"))[y != -1], y[y != -1])


def test_a_set_of_mostly_overlong_conversations_neither_clogs_nor_nans(tok):
    long = [[{"role": "user", "content": "tell me " * 60}, {"role": "assistant", "content": "ok " * 40}]] * 30
    short = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 3
    convs = long[:15] + short + long[15:]
    dropped = pack(convs, tok, block_size=32, overlong="drop")
    assert (dropped.conversations, dropped.dropped, dropped.truncated) == (3, 30, 0)
    assert dropped.trained.sum() == 3 * len(tok.encode("hello") + [0])
    cut = pack(convs, tok, block_size=32, overlong="truncate")
    assert cut.dropped == 30 and cut.truncated == 0  # the prompt alone fills the row: no answer token survives
    cut = pack(convs, tok, block_size=160, overlong="truncate")
    assert (cut.truncated, cut.dropped) == (30, 0) and len(cut.tokens) == 31  # short ones share a row
    assert all(row.any() for row in cut.trained)
    model = GPT(GPTConfig(block_size=32, vocab_size=50269, padded_vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    loader = SFTLoader(dropped, batch_size=2)
    for _ in range(3):
        x, y, docs = loader.next_batch()
        _, loss = model(x, y, doc_ids=docs)
        assert math.isfinite(loss.item())
    with pytest.raises(Gpt2LabError, match="no conversation fits"):
        SFTLoader(pack(long, tok, block_size=32, overlong="drop"), batch_size=2)


def _grads(model, batches, k):
    from gpt2lab.train.loop import forward_backward

    model.zero_grad(set_to_none=True)
    loss = forward_backward(model, MaskedBatches(batches), k, nullcontext, ddp=False, objective=MaskedNextToken())
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_is_the_mean_over_trained_tokens_of_the_global_batch_and_an_empty_micro_batch_is_not_nan():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 128, (4, 16))
    y = torch.full((4, 16), -1)
    y[0, :3] = x[0, 1:4]  # micro-batch 1 (rows 0-1): 3 trained tokens
    y[2:, 5:] = x[2:, 4:15]  # micro-batch 2 (rows 2-3): 22 trained tokens
    whole = _grads(model, [(x, y)], 1)
    split = _grads(model, [(x[:2], y[:2]), (x[2:], y[2:])], 2)
    assert_close_f32(split[0], whole[0])  # not the mean of the two micro-batch means
    for name, g in whole[1].items():
        assert_close_f32(split[1][name], g, terms=x.numel(), msg=name)
    empty = (x[:2], torch.full((2, 16), -1))
    with_empty = _grads(model, [(x[2:], y[2:]), empty], 2)
    alone = _grads(model, [(x[2:], y[2:])], 1)
    assert math.isfinite(with_empty[0]) and with_empty[0] == pytest.approx(alone[0], rel=1e-6)
    for name, g in alone[1].items():
        assert torch.isfinite(with_empty[1][name]).all()
        assert_close_f32(with_empty[1][name], g, terms=x.numel(), msg=name)
    all_empty = _grads(model, [empty, empty], 2)
    assert all_empty[0] == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in all_empty[1].values())
