"""The Muon choices of the references (optim.muon_split, muon_momentum_warmup, muon_router): each one's effect."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.train.muon import Muon, orthogonalise
from gpt2lab.train.optim import OptimConfig, apply_schedule, make_optimizer, muon_momentum_at, muon_param_groups
from tests.conftest import assert_close_f32, assert_not_close_f32
from tests.train.test_muon import MUON, param_names, reference_orthogonalize

MOE = dict(
    block_size=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, pos_embedding="rope", norm="rmsnorm",
    mlp="swiglu", bias=False, tie_embeddings=False, n_experts=4, experts_per_token=2, moe_layers="1", moe_hidden=8,
)  # fmt: skip


@pytest.mark.parametrize("split", [(32, 32, 32), (32, 16, 16), (24, 24)], ids=["qkv", "gqa", "gate-up"])
def test_split_orthogonalises_each_block_on_its_own(split):
    """Each block of rows is U quintic(S) V^T of itself (an SVD reference), its shape scale 1 (no block is tall)."""
    torch.manual_seed(0)
    G = torch.randn(sum(split), 32)
    got = orthogonalise(G, split=split)
    blocks = G.split(list(split))
    expected = torch.cat([reference_orthogonalize(b) for b in blocks])
    assert_close_f32(got, expected, ulps=128)
    assert_not_close_f32(got, orthogonalise(G), ulps=1e4)  # one fused matrix is another update


def test_split_groups_hold_the_fused_weights_with_their_rows():
    model = GPT(GPTConfig(**MOE))
    groups = muon_param_groups(model, OptimConfig(**MUON, muon_split=True))
    by_split = {g.get("split"): param_names(model, g["params"]) for g in groups if g["use_muon"]}
    assert by_split[(16, 8, 8)] == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]  # q 4x4, k, v 2x4
    assert by_split[(8, 8)] == ["transformer.h.1.mlp.experts.gate_up_proj"]
    assert "transformer.h.1.mlp.gate.weight" in by_split[None] and "transformer.h.0.mlp.c_gate.weight" in by_split[None]
    unsplit = muon_param_groups(model, OptimConfig(**MUON))
    assert [g.get("split") for g in unsplit] == [None] * 3  # the default: the groups as before the switch
    assert sum(len(g["params"]) for g in groups) == sum(len(g["params"]) for g in unsplit)


def test_split_changes_the_step_of_the_fused_weights_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MOE))
    states = []
    for split in (False, True):
        m = GPT(GPTConfig(**MOE))
        m.load_state_dict(model.state_dict())
        opt = make_optimizer(m, OptimConfig(**MUON, muon_split=split), "cpu")
        torch.manual_seed(1)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        states.append({name: p.detach() for name, p in m.named_parameters()})
    fused = {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight",
             "transformer.h.1.mlp.experts.gate_up_proj"}  # fmt: skip
    for name, before in model.named_parameters():
        a, b = states[0][name], states[1][name]
        assert not torch.equal(a, before)
        assert torch.equal(a, b) == (name not in fused), name


def test_router_on_adamw():
    model = GPT(GPTConfig(**MOE))
    groups = muon_param_groups(model, OptimConfig(**MUON, muon_router=False))
    muon_names = [n for g in groups if g["use_muon"] for n in param_names(model, g["params"])]
    decay = next(g for g in groups if not g["use_muon"] and g["weight_decay"] > 0)
    assert "transformer.h.1.mlp.gate.weight" not in muon_names
    assert "transformer.h.1.mlp.gate.weight" in param_names(model, decay["params"])
    assert "transformer.h.1.mlp.experts.gate_up_proj" in muon_names


def test_momentum_warms_up_along_the_schedule():
    cfg = OptimConfig(**MUON, lr=1e-3, warmup_steps=0, decay_steps=100, muon_momentum_warmup=10)
    assert [muon_momentum_at(s, cfg) for s in (0, 5, 10, 50)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert muon_momentum_at(0, OptimConfig(**MUON)) == 0.95  # no warmup by default
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    opt = make_optimizer(model, cfg, "cpu")
    assert isinstance(opt, Muon)
    assert apply_schedule(opt, 5, cfg) == pytest.approx(1e-3 * (0.55 + 0.45 * math.cos(math.pi * 0.05)))  # cosine
    muon, *adamw = opt.param_groups
    assert muon["momentum"] == pytest.approx(0.90) and muon["lr"] == pytest.approx(20 * adamw[0]["lr"])
    assert all(g["betas"] == (0.9, 0.95) for g in adamw)  # AdamW's own momentum untouched
