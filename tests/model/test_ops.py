"""The fast paths compute the same function as the plain ones (issue: speed)."""

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.inference.kv_cache import KVCache
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.model.ops import linear_cross_entropy
from tests.conftest import assert_close_f32, assert_not_close_f32


def _plain_ce(h, W, t, V):
    return F.cross_entropy((h @ W.t())[..., :V].float().reshape(-1, V), t.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_cross_entropy_matches_plain_loss_and_grads(chunk):
    torch.manual_seed(0)
    B, T, C, Vp, V = 3, 17, 16, 64, 50  # padded vocabulary: 14 rows never in the loss
    h = torch.randn(B, T, C, requires_grad=True)
    W = torch.randn(Vp, C, requires_grad=True)
    t = torch.randint(0, V, (B, T))
    t[0, :5] = -1  # masked positions
    plain = _plain_ce(h, W, t, V)
    gh, gW = torch.autograd.grad(3 * plain, (h, W))
    fused = linear_cross_entropy(h, W, t, V, chunk_size=chunk)
    fh, fW = torch.autograd.grad(3 * fused, (h, W))
    assert_close_f32(fused, plain)  # chunked sums: another order, another rounding of the same values
    assert_close_f32(fh, gh, terms=B * T)  # gradients: sums over the B*T rows (and the vocabulary)
    assert_close_f32(fW, gW, terms=B * T)
    assert fW[V:].abs().max() == 0  # padded rows get no gradient


def test_linear_cross_entropy_under_bf16_autocast_is_close():
    torch.manual_seed(1)
    h = torch.randn(64, 32)
    W = torch.randn(100, 32) * 0.1
    t = torch.randint(0, 90, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _plain_ce(h, W, t, 90)
        fused = linear_cross_entropy(h, W, t, 90, chunk_size=16)
    # both paths round the logits to bfloat16 (eps 2**-7), the chunked one in other GEMM shapes
    torch.testing.assert_close(fused.float(), plain.float(), rtol=torch.finfo(torch.bfloat16).eps, atol=0)


def test_model_with_fused_loss_equals_plain_model():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=97, padded_vocab_size=128, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    x = torch.randint(0, 97, (4, 16))
    y = torch.randint(0, 97, (4, 16))
    y[:, :3] = -1
    _, plain = model(x, y)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    model.ce_chunk_size = 24
    logits, fused = model(x, y)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    assert logits is None  # never materialised
    assert_close_f32(fused, plain)
    assert_not_close_f32(fused, plain * (64 - 12) / 64)  # the check bites: a mean that counted the masked targets
    for a, b in zip(fused_grads, plain_grads):
        assert_close_f32(a, b, terms=x.numel())  # sums over the B*T rows


@pytest.mark.parametrize("static", [False, True])
def test_kv_cache_decoding_matches_full_forward(static):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=100, padded_vocab_size=128, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg).eval()
    x = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(cfg, 3, 24, static=static)
        steps = [model(x[:, :12], kv_cache=cache)[0]]
        steps += [model(x[:, t : t + 1], kv_cache=cache)[0] for t in range(12, 20)]
        assert_close_f32(torch.cat(steps, 1), full)  # one query row at a time: other GEMM shapes
        assert cache.pos == 20
        cache.reset()  # a chunk of several tokens after a cached prefix
        model(x[:, :5], kv_cache=cache)
        chunk, _ = model(x[:, 5:], kv_cache=cache)
        assert_close_f32(chunk, full[:, 5:])
        assert_not_close_f32(chunk[:, 1:], full[:, 5:-1])  # the check bites: logits one position off
