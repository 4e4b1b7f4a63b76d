"""The network itself: KV-cache decoding, padded vocabulary, loss masking, initialisation.

Parity with Hugging Face's implementation lives in test_hf.py; here the reference for the
cache is the model's own full forward, which test_hf.py ties to transformers.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.inference.kv_cache import KVCache
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from tests.conftest import assert_close_f32


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(block_size=32, vocab_size=300, n_layer=2, n_head=4, n_embd=32) | overrides
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_one_token_at_a_time_equals_full_forward(batch):
    model = tiny()
    idx = torch.randint(0, 300, (batch, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, batch, 20)
        prefill, _ = model(idx[:, :7], kv_cache=cache)
        steps = [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(7, 20)]
    assert cache.pos == 20
    assert_close_f32(torch.cat([prefill, *steps], dim=1), full)


def test_kv_cache_multi_token_chunk_after_prefix_equals_full_forward():
    model = tiny(n_layer=3)
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 2, 16)
        a, _ = model(idx[:, :5], kv_cache=cache)
        b, _ = model(idx[:, 5:9], kv_cache=cache)  # a 4-token chunk must see the prefix causally
        c, _ = model(idx[:, 9:10], kv_cache=cache)
        d, _ = model(idx[:, 10:], kv_cache=cache)
    assert_close_f32(torch.cat([a, b, c, d], dim=1), full)


def test_kv_cache_and_context_limits_are_enforced():
    model = tiny(block_size=8)
    with pytest.raises(ValueError, match="exceeds block_size"):
        KVCache(model.config, 1, 9)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = KVCache(model.config, 1, 4)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_padded_vocab_is_sliced_off_logits_and_loss():
    model = tiny(vocab_size=300, padded_vocab_size=320)
    assert model.lm_head.weight.shape == (320, 32)
    with torch.no_grad():
        model.lm_head.weight[300:] = 50.0  # padded rows that would dominate if they leaked
    idx = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(4))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 10, 300)
    expected = F.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1))  # over the real vocabulary only
    assert_close_f32(loss, expected)


def test_targets_minus_one_are_ignored():
    model = tiny()
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(6))
    targets[0, :5] = -1
    targets[1, 9:] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    assert_close_f32(loss, expected)


def test_weights_are_tied_and_initialised_like_gpt2():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=4, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 4)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.ln_1.weight == 1)
    assert torch.all(model.transformer.ln_f.bias == 0)
    # tied weights counted once; the default count leaves out position embeddings
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == n
    assert model.num_params() == n - 64 * 256


def test_presets_have_gpt2_sizes():
    sizes = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168}  # Hugging Face's parameter counts
    for name, expected in sizes.items():
        with torch.device("meta"):
            model = GPT(GPTConfig.from_preset(name))
        assert model.num_params(non_embedding=False) == expected
    with pytest.raises(KeyError, match="unknown model preset"):
        GPTConfig.from_preset("gpt3")
