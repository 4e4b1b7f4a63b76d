"""sft.packing: a document mask makes each packed conversation compute what it computes alone; pad, one per row."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from gpt2lab.chat.template import render
from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.sft.data import SFTLoader, pack
from gpt2lab.tokenizer.bpe import get_tokenizer
from gpt2lab.train.objective import MaskedNextToken
from tests.conftest import assert_close_f32, assert_fused_loss_and_recompute_match_plain, assert_not_close_f32
from tests.sft.conftest import MaskedBatches

VOCAB = dict(vocab_size=50269, padded_vocab_size=50304)  # GPT-2's tokens and the chat's special ones
VARIANTS = {
    "gpt2": {},  # learned positions: they restart at each conversation
    "rope-gqa-ve": dict(pos_embedding="rope", norm="rmsnorm", n_kv_head=1, qk_norm=True, value_embeddings=True),
    "mla": dict(attention="mla", pos_embedding="rope", norm="rmsnorm", bias=False),
}


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _conversations(n: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"question {i}" + " more" * (i % 4)}, {"role": "assistant", "content": f"a{i}"}]
        for i in range(n)
    ]


def _model(variant: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=48, n_layer=2, n_head=2, n_embd=32, **VOCAB, **VARIANTS[variant]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_packed_row_with_the_document_mask_gives_each_conversation_its_logits_alone(tok, variant):
    packed = pack(_conversations(8), tok, block_size=48, packing="mask")
    assert len(packed.tokens) < 8  # several conversations share a row
    x, _, docs = SFTLoader(packed, batch_size=len(packed.tokens), shuffle=False).next_batch()
    model = _model(variant).eval()
    with torch.no_grad():
        masked, _ = model(x, doc_ids=docs)
        cross, _ = model(x)  # sft.packing = cross: the same rows without the mask
    later = 0
    for b in range(len(x)):
        for d in docs[b].unique().tolist()[:-1]:  # the last "document" of a row is its padding (or a cut one)
            where = (docs[b] == d).nonzero().flatten()
            with torch.no_grad():
                alone, _ = model(x[b, where][None])  # the conversation by itself, from position 0
            assert_close_f32(masked[b, where], alone[0], msg=f"row {b} conversation {d}")
            if d > 0:  # a later conversation of the row: without the mask it sees the earlier ones
                assert_not_close_f32(cross[b, where], alone[0])
                later += 1
    assert later >= 3


def test_the_mask_keeps_fused_loss_and_recompute_equal_to_the_plain_path(tok):
    """perf.ce_chunk_size and activation checkpointing take doc_ids through: the same loss and gradients."""
    packed = pack(_conversations(8), tok, block_size=48, packing="mask")
    x, y, docs = SFTLoader(packed, batch_size=len(packed.tokens), shuffle=False).next_batch()
    assert_fused_loss_and_recompute_match_plain(lambda: _model("gpt2"), x, y, doc_ids=docs)


def test_doc_ids_with_a_kv_cache_is_refused():
    from gpt2lab.inference.kv_cache import KVCache

    model = _model("gpt2").eval()
    with pytest.raises(ValueError, match="not for decoding with a KV cache"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=KVCache(model.config, 1, 8), doc_ids=torch.zeros(1, 4))


def test_pad_rows_hold_one_conversation_each(tok):
    convs = _conversations(6)
    padded = pack(convs, tok, block_size=48, packing="pad")
    assert padded.docs is None and len(padded.tokens) == padded.conversations == 6
    assert len(pack(convs, tok, block_size=48, packing="cross").tokens) < 6
    for row, trained, conv in zip(padded.tokens, padded.trained, convs):
        ids, mask = render(conv, tok)
        assert row[: len(ids)].tolist() == ids and trained[: len(ids)].tolist() == [bool(m) for m in mask]
        assert (row[len(ids) :] == tok.eot).all() and not trained[len(ids) :].any()  # padding, never trained
    batch = SFTLoader(padded, batch_size=2).next_batch()
    assert len(batch) == 2  # (x, y): nothing to mask


def test_an_all_masked_micro_batch_with_doc_ids_is_not_nan(tok):
    from gpt2lab.train.loop import forward_backward

    packed = pack(_conversations(8), tok, block_size=48, packing="mask")
    x, y, docs = SFTLoader(packed, batch_size=2, shuffle=False).next_batch()
    empty = (x, torch.full_like(y, -1), docs)

    def step(batches):
        model = _model("gpt2")
        loss = forward_backward(
            model, MaskedBatches(batches), len(batches), nullcontext, ddp=False, objective=MaskedNextToken()
        )
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    alone, with_empty = step([(x, y, docs)]), step([empty, (x, y, docs)])
    assert math.isfinite(with_empty[0]) and with_empty[0] == pytest.approx(alone[0], rel=1e-6)
    for name, g in alone[1].items():
        assert_close_f32(with_empty[1][name], g, terms=x.numel(), msg=name)
    all_empty = step([empty, empty])
    assert all_empty[0] == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in all_empty[1].values())


def test_a_loader_saved_with_the_mask_refuses_to_resume_without_it(tok):
    convs = _conversations(8)
    state = SFTLoader(pack(convs, tok, block_size=48, packing="mask"), batch_size=2).state_dict()
    with pytest.raises(Gpt2LabError, match="sft.packing = mask; resume with --set sft.packing=mask"):
        SFTLoader(pack(convs, tok, block_size=48, packing="cross"), batch_size=2).load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "doc_mask"}  # a run saved before sft.packing: cross
    with pytest.raises(Gpt2LabError, match="--set sft.packing=cross"):
        SFTLoader(pack(convs, tok, block_size=48, packing="mask"), batch_size=2).load_state_dict(older)
