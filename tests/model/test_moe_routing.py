"""DeepSeek-V3's routing in gpt2lab.model.moe: group-limited top-k and routed_scaling_factor equal transformers'
DeepseekV3MoE, the defaults leave the plain routing alone, the routing bias stays float32 under a bf16 cast and
does not move on a training step that was skipped."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import pytest
import torch

from gpt2lab.checkpoint.folder import save_model
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.model.moe import MoE
from tests.conftest import assert_close_f32, assert_not_close_f32
from tests.model.test_moe import assert_same_routing, deepseek_v3_moe_state

BASE = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32, pos_embedding="rope", norm="rmsnorm",
            mlp="swiglu", mlp_hidden=40, bias=False, tie_embeddings=False)  # fmt: skip
# DeepSeek-V3's routing at a tiny size: 8 experts in 4 groups of 2, the 2 best groups eligible, 3 experts per token
ROUTING = dict(n_experts=8, experts_per_token=3, moe_hidden=12, moe_router="sigmoid", n_shared_experts=1,
               moe_n_group=4, moe_topk_group=2, moe_routed_scaling_factor=2.5, moe_bias_update_rate=0.0)  # fmt: skip


def _moe(**switches) -> MoE:
    """One MoE block with sharp router logits and a random routing bias (both must matter)."""
    torch.manual_seed(0)
    moe = GPT(GPTConfig(**{**BASE, **ROUTING, **switches})).eval().transformer.h[0].mlp
    with torch.no_grad():
        moe.gate.weight.mul_(20)
        moe.e_score_correction_bias.copy_(0.1 * torch.randn(moe.n_experts))
    return moe


def _deepseek_v3_moe(moe: MoE, **routing):
    """transformers' DeepseekV3MoE holding this block's weights."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(
        hidden_size=32, hidden_act="silu", n_routed_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
        moe_intermediate_size=12, n_shared_experts=1, norm_topk_prob=moe.norm_topk_prob, **routing,
    )  # fmt: skip
    theirs = DeepseekV3MoE(config)
    theirs.load_state_dict(deepseek_v3_moe_state(moe))
    return theirs


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_group_limited_scaled_routing_equals_deepseek_v3_moe(norm_topk_prob):
    moe = _moe(moe_norm_topk_prob=norm_topk_prob)
    theirs = _deepseek_v3_moe(moe, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        expected = theirs(x)
        assert_close_f32(moe(x), expected)
        assert_same_routing(moe, theirs, x)
        # each switch bites: routing over every group, or unscaled weights, is another function here
        moe.topk_group = moe.n_group
        assert_not_close_f32(moe(x), expected)
        moe.topk_group, moe.routed_scaling_factor = 2, 1.0
        assert_not_close_f32(moe(x), expected)


def test_the_defaults_route_as_before_and_every_group_kept_is_no_limit():
    """moe_n_group = moe_topk_group = 1 and a factor of 1 are the plain sigmoid top-k (transformers' too)."""
    plain = _moe(moe_n_group=1, moe_topk_group=1, moe_routed_scaling_factor=1.0)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        expected = _deepseek_v3_moe(plain, n_group=1, topk_group=1, routed_scaling_factor=1.0)(x)
        assert_close_f32(plain(x), expected)
        every_group = _moe(moe_n_group=4, moe_topk_group=4, moe_routed_scaling_factor=1.0)
        assert torch.equal(every_group(x), plain(x))
    new = ("moe_n_group", "moe_topk_group", "moe_routed_scaling_factor")
    old = {k: v for k, v in dataclasses.asdict(GPTConfig(**BASE, n_experts=8)).items() if k not in new}
    cfg = GPTConfig.from_dict(old)  # a checkpoint's config written before these fields existed
    assert (cfg.moe_n_group, cfg.moe_topk_group, cfg.moe_routed_scaling_factor) == (1, 1, 1.0)


def test_bad_routing_configs_are_refused_naming_the_field():
    for bad, field in [(dict(moe_n_group=3), "model.moe_n_group"), (dict(moe_n_group=0), "model.moe_n_group"),
                       (dict(moe_topk_group=5), "model.moe_topk_group"),
                       (dict(moe_topk_group=0), "model.moe_topk_group"),
                       (dict(moe_n_group=8, moe_topk_group=4), "at least 2"),
                       (dict(moe_topk_group=1), "model.experts_per_token"),
                       (dict(moe_routed_scaling_factor=0.0), "model.moe_routed_scaling_factor"),
                       (dict(moe_routed_scaling_factor=float("nan")), "model.moe_routed_scaling_factor"),
                       (dict(moe_router="softmax"), "needs model.moe_router=sigmoid")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            GPTConfig(**{**BASE, **ROUTING, **bad})
    GPTConfig(**{**BASE, **ROUTING, "moe_router": "softmax", "moe_n_group": 1, "moe_topk_group": 1,
                 "moe_routed_scaling_factor": 1.0})  # fmt: skip


# ----------------------------------------------------------------------------- the routing bias stays float32


def test_the_routing_bias_stays_float32_when_the_model_is_cast(tmp_path):
    from gpt2lab.interop.load import load_model

    model = GPT(GPTConfig(**{**BASE, **ROUTING}))
    bias = torch.tensor([0.2003, -0.0417, 0.001, 0.0, 0.3, -0.25, 0.12345, 1e-4])  # float32 values bf16 rounds
    assert not torch.equal(bias.bfloat16().float(), bias)
    for moe in model.moe_layers():
        moe.e_score_correction_bias.copy_(bias)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(str(tmp_path / "ckpt"), dtype="bfloat16")  # what `gpt2lab serve --dtype bfloat16` does
    for dtype, cast in [(torch.bfloat16, lambda: model.to(torch.bfloat16)), (torch.bfloat16, lambda: loaded),
                        (torch.float16, model.half), (torch.float32, model.float)]:  # fmt: skip
        cast = cast()
        assert cast.lm_head.weight.dtype == dtype  # the weights were cast ...
        for moe in cast.moe_layers():  # ... the bias was not: 0.2003 is still 0.2003, not bf16's 0.2002
            assert moe.e_score_correction_bias.dtype == torch.float32
            assert torch.equal(moe.e_score_correction_bias, bias)
    with torch.no_grad():
        logits, _ = loaded(torch.randint(0, 97, (1, 8)))  # a bf16 model with its float32 bias runs
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- a skipped step moves no bias


def test_a_step_skipped_for_a_non_finite_loss_leaves_the_routing_bias_alone():
    from gpt2lab.train.loop import train_step

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **ROUTING, "moe_bias_update_rate": 0.01})).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 97, (4, 17))

    class Batches:
        def next_batch(self):
            return data[:, :-1], data[:, 1:]

    def step():
        return train_step(model, model, opt, Batches(), 1, autocast=nullcontext, grad_clip=1.0)

    head = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight[data[0, 1]] = float("nan")  # the loss is NaN; the routing before the head is not
    before = [m.e_score_correction_bias.clone() for m in model.moe_layers()]
    loss, _, _ = step()
    assert loss != loss  # NaN: the step was skipped
    for moe, bias in zip(model.moe_layers(), before, strict=True):
        assert torch.equal(moe.e_score_correction_bias, bias)
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
    loss, _, _ = step()  # the next step balances from its own load only, not the skipped one's too
    assert loss == loss
    tokens = data[:, :-1].numel()
    for moe, bias in zip(model.moe_layers(), before, strict=True):
        assert moe.last_load.sum().item() == tokens * moe.top_k
        assert not torch.equal(moe.e_score_correction_bias, bias)
