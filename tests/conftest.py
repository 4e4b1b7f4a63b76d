"""Shared test set-up: the offline mirror in ../shared/data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT2LAB_MIRROR", REPO.parent / "shared" / "data")).resolve()

# Point every offline path at the mirror before gpt2lab is imported anywhere.
os.environ.setdefault("GPT2LAB_MIRROR", str(SHARED_DATA))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread_and_no_leaked_torch_state():
    """Each test runs torch on one thread, and must not leave grad mode or the thread count changed.

    Tiny models run faster on one thread, and on a shared CPU multi-threaded ops stall.
    """
    import torch

    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    leaked = (torch.is_grad_enabled(), torch.get_num_threads()) != (grad, 1)
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)
    assert not leaked, "the test left torch's grad mode or thread count changed"


# ----------------------------------------------------------------------------- float32 comparisons

F32_EPS = 2.0**-23  # float32 machine epsilon: the relative size of one rounding
# The default tolerance, in roundings of the magnitude compared. Forward values (logits, losses) of
# two float32 code paths differ by up to ~4 of them here (AVX2, ATen's default kernels, MKL's SSE4.2
# ones, 1 or 2 threads) and 0.35 on the Intel Xeon where a fixed 1e-5 failed: 32 leaves room for other CPUs.
ULPS = 32


def f32_error(actual, expected, *, scale: float | None = None, terms: int = 1) -> float:
    """max |actual - expected| in units of float32 eps x scale x sqrt(terms); scale: max |expected| unless given."""
    import torch

    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    scale = expected.abs().max().item() if scale is None else scale
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    unit = F32_EPS * scale * terms**0.5
    return 0.0 if err == 0 else err / unit if unit > 0 else float("inf")


def assert_close_f32(
    actual, expected, *, ulps: float = ULPS, scale: float | None = None, terms: int = 1, msg: str = ""
) -> None:
    """actual equals expected up to ``ulps`` float32 roundings of the magnitude compared.

    Two float32 computations of one function round differently when they sum in another order:
    another CPU's vector width or GEMM blocking, another thread count, another batch shape. The
    difference scales with the magnitudes involved, so the tolerance is ulps x eps x scale:
    scale is max |expected| by default (one scale per tensor, so values near zero get the
    tensor's tolerance, not a relative one they could never meet); pass it where the values
    compared come out of larger ones (a loss that is a difference of large logits). ``terms``:
    how many values were summed into each one where the sum can cancel (a gradient over B*T
    rows), whose rounding grows like sqrt(terms). assert_not_close_f32 shows in the tests that a
    bug of the size they guard against exceeds the tolerance.
    """
    err = f32_error(actual, expected, scale=scale, terms=terms)
    assert err <= ulps, f"{msg + ': ' if msg else ''}off by {err:.3g} roundings of the scale, more than {ulps}"


def assert_not_close_f32(actual, expected, *, ulps: float = ULPS, scale: float | None = None, terms: int = 1) -> None:
    """The same comparison fails on actual: a bug of this size would be caught (the test bites)."""
    err = f32_error(actual, expected, scale=scale, terms=terms)
    assert not err <= ulps, f"a bug-sized change moved the result by only {err:.3g} roundings (<= {ulps})"


def cached_decoding(model, idx, prefill: int = 5, max_len: int | None = None, static: bool = False):
    """The logits of ``idx`` decoded through a KV cache: a prefill, then one token at a time (no grad).

    A test compares them with the full forward ``model(idx)[0]``: the cache must not change the function.
    """
    import torch

    from gpt2lab.inference.kv_cache import KVCache

    T = idx.size(1)
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=idx.size(0), max_len=max_len or T, static=static)
        steps = [model(idx[:, :prefill], kv_cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(prefill, T)]
    return torch.cat(steps, dim=1)


def assert_fused_loss_and_recompute_match_plain(make_model, x, y=None, **forward_kwargs) -> None:
    """perf.ce_chunk_size (7) with activation checkpointing gives the plain path's loss and gradients.

    ``make_model()`` builds the same model (same weights) each call; y defaults to x (inputs as targets);
    ``forward_kwargs`` go to every forward (e.g. doc_ids).
    """
    y = x if y is None else y
    results = []
    for chunk, recompute in ((0, False), (7, True)):
        model = make_model().train()
        model.ce_chunk_size, model.activation_checkpointing = chunk, recompute
        _, loss = model(x, y, **forward_kwargs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert_close_f32(loss_b, loss_a)
    for name, grad in grads_a.items():
        assert_close_f32(grads_b[name], grad, terms=32, msg=name)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "gpt2_tokenizer" / "vocab.bpe").is_file():
        pytest.fail(f"the offline data mirror is missing at {SHARED_DATA} (set GPT2LAB_MIRROR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer(shared_data):
    from gpt2lab.tokenizer.bpe import get_tokenizer

    return get_tokenizer()


def tiny_deepseek_v3(seed: int, **overrides):
    """A tiny transformers DeepseekV3ForCausalLM (MLA attention, MoE in blocks 1 and 2), with sharp routers and a
    random routing bias so that its routing choices matter; ``overrides`` change its config."""
    import torch
    import transformers

    settings = dict(
        vocab_size=97, hidden_size=36, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=10, q_lora_rank=None, qk_nope_head_dim=5,
        qk_rope_head_dim=6, v_head_dim=7, max_position_embeddings=32, num_nextn_predict_layers=0,
    )  # fmt: skip
    config = transformers.DeepseekV3Config(**(settings | overrides))
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.weight.mul_(20)
            layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(config.n_routed_experts))
    return model


# ----------------------------------------------------------------------------- gloo ranks in spawned processes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world_size: int, port: int):
    """Join a gloo group as torchrun's rank ``rank`` would: its environment, then gpt2lab's init_distributed."""
    from gpt2lab.runtime.dist import init_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return init_distributed("cpu")
