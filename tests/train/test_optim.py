"""AdamW decay groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.train.optim import OptimConfig, lr_at, make_optimizer, param_groups


def test_lr_schedule_at_warmup_start_end_and_last_step():
    cfg = OptimConfig(lr=6e-4, min_lr_ratio=0.1, warmup_steps=715, decay_steps=19073)
    assert lr_at(0, cfg) == pytest.approx(6e-4 / 715)  # never 0 at the first step
    assert lr_at(714, cfg) == pytest.approx(6e-4)  # the last warmup step reaches the peak
    assert lr_at(715, cfg) == pytest.approx(6e-4)  # the cosine starts at the peak
    assert lr_at(19073, cfg) == pytest.approx(6e-5)  # the end of the decay: 10 %
    assert lr_at(19072, cfg) == pytest.approx(6e-5, rel=1e-7)
    assert lr_at(30000, cfg) == pytest.approx(6e-5)  # flat after
    mid = 715 + (19073 - 715) // 2
    assert lr_at(mid, cfg) == pytest.approx(3.3e-4)  # halfway down the cosine: (max + min) / 2
    # an independent formula (nanoGPT's get_lr) at a few points in between
    for step in (800, 5000, 12345, 19000):
        ratio = (step - 715) / (19073 - 715)
        expected = 6e-5 + 0.5 * (1 + math.cos(math.pi * ratio)) * (6e-4 - 6e-5)
        assert lr_at(step, cfg) == pytest.approx(expected, rel=1e-12)


def test_lr_schedule_needs_resolved_decay_steps():
    with pytest.raises(ValueError, match="decay_steps"):
        lr_at(0, OptimConfig())


def test_decay_groups_hold_exactly_the_2d_weights():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, padded_vocab_size=128, n_layer=2, n_head=2, n_embd=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # the tied wte/lm_head weight appears once
    decayed = sorted(names[id(p)] for p in decay["params"])
    plain = sorted(names[id(p)] for p in no_decay["params"])
    expected_2d = ["lm_head.weight", "transformer.wpe.weight"] + [
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert sorted(n.replace("transformer.wte.weight", "lm_head.weight") for n in decayed) == sorted(expected_2d)
    assert all(n.endswith(".bias") or ".ln_" in n for n in plain)
    assert len(plain) == 2 * (4 + 4) + 2  # per block: 4 linear biases + 2 LayerNorms x (w, b); plus ln_f
    assert len(decay["params"]) + len(plain) == len(list(model.parameters()))


def test_adamw_settings_and_no_fused_kernel_on_cpu():
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    opt = make_optimizer(model, OptimConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6 and not opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
