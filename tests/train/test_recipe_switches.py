"""The recipe switches of modded-nanogpt and nanochat: model.zero_init_proj, x0_skip and value_embeddings.

Each is off by default (GPT-2), computes what its docstring says, starts as the network without it,
and works wherever the model runs: KV-cache decoding, activation checkpointing, the fused loss,
checkpoints; export refuses what has no Hugging Face form.
"""

from __future__ import annotations

import pytest
import torch

from gpt2lab.checkpoint.folder import load_model, save_model
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from tests.conftest import assert_close_f32, assert_fused_loss_and_recompute_match_plain, cached_decoding

BASE = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32)
MODERN = dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", bias=False, tie_embeddings=False)


def _model(**switches) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**BASE, **switches})).eval()


def _perturbed(model: GPT) -> GPT:
    """x0_skip's scalars away from (1, 0) and value embeddings away from 0, so a skip or a value embedding
    applied wrongly (or not at all) shows."""
    with torch.no_grad():
        if model.x0_skip is not None:
            model.x0_skip.resid_lambdas.copy_(1 + 0.3 * torch.randn(model.config.n_layer))
            model.x0_skip.x0_lambdas.copy_(0.5 * torch.randn(model.config.n_layer))
        for table in model.value_embeds.values():
            table.weight.normal_(0, 0.5)
    return model


SKIPS = {"x0_skip": dict(x0_skip=True), "value_embeddings": dict(value_embeddings=True, n_kv_head=2),
         "both_modern": dict(x0_skip=True, value_embeddings=True, n_kv_head=2, **MODERN)}  # fmt: skip


# ----------------------------------------------------------------------------- zero_init_proj

RESIDUAL_OUTPUTS = ("attn.c_proj.weight", "mlp.c_proj.weight", "down_proj", "shared_experts.c_proj.weight")


@pytest.mark.parametrize(
    "switches",
    [
        {},
        MODERN,
        dict(mlp="swiglu"),
        dict(attention="mla", pos_embedding="rope"),
        dict(n_experts=4, n_shared_experts=1),
    ],
    ids=["gpt2", "modern", "swiglu", "mla", "moe"],
)
def test_zero_init_proj_zeroes_the_residual_outputs_and_leaves_every_other_weight_as_gpt2(switches):
    zero, gpt2 = _model(zero_init_proj=True, **switches), _model(**switches)
    residual = [n for n in zero.state_dict() if n.endswith(RESIDUAL_OUTPUTS)]
    assert len(residual) >= 2 * BASE["n_layer"]  # attention's and the MLP's (or experts') of every block
    for name, weight in zero.state_dict().items():
        if name in residual:
            assert torch.equal(weight, torch.zeros_like(weight)), name
            assert gpt2.state_dict()[name].abs().max() > 0
        else:
            assert torch.equal(weight, gpt2.state_dict()[name]), name  # the same random draws, one thing changed


def test_zero_init_proj_blocks_start_as_the_identity_and_still_learn():
    model = _model(zero_init_proj=True)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        embeddings = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(16))
        assert torch.equal(model.forward_hidden(idx), model.transformer.ln_f(embeddings))
    _, loss = model.train()(idx, idx)
    loss.backward()
    for block in model.transformer.h:  # the zeros get gradients, so training moves them
        assert block.attn.c_proj.weight.grad.abs().max() > 0 and block.mlp.c_proj.weight.grad.abs().max() > 0


def test_zero_init_proj_model_exports_as_gpt2():
    from gpt2lab.interop.hf import check_gpt2

    check_gpt2(GPTConfig(**BASE, zero_init_proj=True))  # only the start differs: the network is GPT-2's


# ----------------------------------------------------------------------------- x0_skip


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
def test_x0_skip_starts_as_the_network_without_it(switches):
    skip, plain = _model(x0_skip=True, **switches), _model(**switches)
    assert skip.x0_skip.resid_lambdas.tolist() == [1.0, 1.0] and skip.x0_skip.x0_lambdas.tolist() == [0.0, 0.0]
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(skip(idx)[0], plain(idx)[0])  # exactly: 1 * x + 0 * x0 is x
    assert set(skip.state_dict()) - set(plain.state_dict()) == {"x0_skip.resid_lambdas", "x0_skip.x0_lambdas"}


def test_x0_skip_mixes_the_embeddings_into_every_block_input():
    model = _perturbed(_model(x0_skip=True))
    idx = torch.randint(0, 97, (2, 16))
    lam, lam0 = model.x0_skip.resid_lambdas, model.x0_skip.x0_lambdas
    with torch.no_grad():
        x = x0 = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(16))
        for i, block in enumerate(model.transformer.h):
            x = block(lam[i] * x + lam0[i] * x0)
        assert_close_f32(model.forward_hidden(idx), model.transformer.ln_f(x))


def test_x0_skip_scalars_get_gradients_and_are_not_decayed():
    from gpt2lab.train.optim import param_groups

    model = _model(x0_skip=True).train()
    idx = torch.randint(0, 97, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.x0_skip.resid_lambdas.grad.abs().min() > 0 and model.x0_skip.x0_lambdas.grad.abs().min() > 0
    no_decay = param_groups(model, 0.1)[1]["params"]
    assert any(p is model.x0_skip.x0_lambdas for p in no_decay)


@pytest.mark.parametrize("name", SKIPS)
def test_kv_cache_decoding_equals_the_full_forward(name):
    model = _perturbed(_model(zero_init_proj=True, **SKIPS[name]))
    with torch.no_grad():
        for p in model.parameters():  # zero projections would hide the blocks: give them weights
            if not p.abs().max():
                p.normal_(0, 0.02)
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
    assert_close_f32(cached_decoding(model, idx), full)  # a prefill of 5, then one token at a time


def test_fused_loss_and_recompute_give_the_plain_loss_and_gradients():
    x = torch.randint(0, 97, (2, 16))
    assert_fused_loss_and_recompute_match_plain(lambda: _perturbed(_model(**SKIPS["both_modern"])), x)


def test_the_switches_save_and_load(tmp_path):
    model = _perturbed(_model(zero_init_proj=True, **SKIPS["both_modern"]))
    back = load_model(save_model(model, tmp_path / "ckpt"))
    assert back.config == model.config
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])
    assert torch.equal(back.x0_skip.x0_lambdas, model.x0_skip.x0_lambdas)
    assert torch.equal(back.value_embeds["1"].weight, model.value_embeds["1"].weight)


@pytest.mark.parametrize("switch", ["x0_skip", "value_embeddings"])
def test_export_refuses_the_skips_naming_the_switch(switch, tmp_path, capsys):
    from gpt2lab.cli.main import main
    from gpt2lab.interop.llama import family

    llama = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    assert family(GPTConfig(**BASE, **llama)) == "llama"
    assert family(GPTConfig(**BASE, **llama, **{switch: True})) is None  # a Llama but for the switch is no Llama
    ckpt = save_model(_model(**{switch: True}), tmp_path / "ckpt")
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"model.{switch}=True" in err and "no Hugging Face equivalent" in err
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- value_embeddings


def test_value_embeddings_sit_in_every_other_block_ending_with_the_last():
    layers = {
        n: GPTConfig(**{**BASE, "n_layer": n}, value_embeddings=True).value_embedding_layers for n in (1, 2, 3, 4)
    }
    assert layers == {1: (0,), 2: (1,), 3: (0, 2), 4: (1, 3)}
    assert GPTConfig(**BASE).value_embedding_layers == ()
    with pytest.raises(ValueError, match="model.value_embeddings needs model.attention=mha"):
        GPTConfig(**BASE, value_embeddings=True, attention="mla", pos_embedding="rope")


@pytest.mark.parametrize("switches", [{}, dict(n_kv_head=2, **MODERN)], ids=["gpt2", "modern_gqa"])
def test_value_embeddings_start_as_the_network_without_them_and_learn(switches):
    ve, plain = _model(value_embeddings=True, n_layer=3, **switches), _model(n_layer=3, **switches)
    assert set(ve.state_dict()) - set(plain.state_dict()) == {"value_embeds.0.weight", "value_embeds.2.weight"}
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(ve(idx)[0], plain(idx)[0])  # zero tables: exactly the same values
    _, loss = ve.train()(idx, idx)
    loss.backward()
    for table in ve.value_embeds.values():
        assert table.weight.grad[idx.unique()].abs().amax(dim=1).min() > 0  # every token seen gets a gradient


def test_a_value_embedding_is_added_to_the_block_values():
    """With one token repeated, block 1's value embedding is a constant added to its values: the v bias."""
    model = _perturbed(_model(value_embeddings=True))
    plain = _model()
    with torch.no_grad():
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("value_embeds")})
        C = model.config.n_embd
        plain.transformer.h[1].attn.c_attn.bias[2 * C :] += model.value_embeds["1"].weight[7]
        idx = torch.full((2, 16), 7)
        assert_close_f32(model(idx)[0], plain(idx)[0])
        assert not torch.allclose(model(idx)[0], _model()(idx)[0], atol=1e-3)  # it does change the output
