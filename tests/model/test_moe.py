"""Mixture of experts (gpt2lab.model.moe): the batched experts equal a per-token loop, the router equals
transformers' Qwen3-MoE, Mixtral and DeepSeek-V3 ones, the balancing works, and an MoE model trains,
resumes exactly, decodes, and goes to and from Qwen3MoeForCausalLM / MixtralForCausalLM."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.checkpoint.folder import save_model
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.model.moe import MoE
from tests.conftest import assert_close_f32, assert_not_close_f32, cached_decoding
from tests.train.test_loop import read_metrics, shakespeare_data, write_config  # noqa: F401 (fixture)

BASE = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32)
LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=40, bias=False, tie_embeddings=False,
             n_kv_head=2, rope_theta=500.0, layer_norm_epsilon=1e-6)  # fmt: skip
MOE = dict(n_experts=5, experts_per_token=2, moe_hidden=12, moe_bias_update_rate=0.0)  # odd sizes on purpose


def _model(**switches) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **switches})).eval()
    with torch.no_grad():  # non-trivial norm weights and wider router logits, so a slip shows
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "q_norm.weight", "k_norm.weight")):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.mul_(20)
    return model


def _moe(**switches) -> MoE:
    """One MoE block of a model, with a non-zero routing bias (it must steer the choice only)."""
    moe = _model(**{**LLAMA, **MOE, **switches}).transformer.h[0].mlp
    with torch.no_grad():
        moe.e_score_correction_bias.copy_(0.1 * torch.randn(moe.n_experts))
    return moe


def _reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE written plainly, one token at a time: route, run the k experts, weigh, add the shared ones."""
    out = []
    for token in x.reshape(-1, x.size(-1)):
        logits = moe.gate.weight @ token
        scores = logits.softmax(-1) if moe.router == "softmax" else logits.sigmoid()
        chosen = (scores + moe.e_score_correction_bias).topk(moe.top_k).indices
        weights = scores[chosen] / (scores[chosen].sum() if moe.norm_topk_prob else 1)
        y = torch.zeros_like(token)
        for e, w in zip(chosen.tolist(), weights, strict=True):
            gate, up = (moe.experts.gate_up_proj[e] @ token).chunk(2)
            y += w * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
        if moe.shared_experts is not None:
            y += moe.shared_experts(token)
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize(
    "switches",
    [dict(), dict(moe_router="sigmoid", n_shared_experts=2), dict(moe_norm_topk_prob=False, experts_per_token=1)],
)
def test_batched_experts_equal_a_per_token_loop(switches, monkeypatch):
    moe = _moe(**switches)
    with torch.no_grad():
        for tokens, in_cuda_graph in ((24, False), (2, False), (24, True)):
            # grouped by expert; N*k <= E (decoding): gathered weights; in a CUDA graph: every expert, no sync
            if in_cuda_graph:
                monkeypatch.setattr(moe.experts, "_grouped", moe.experts._dense)
            x = torch.randn(1, tokens, 32)
            expected = _reference_moe(moe, x)
            assert_close_f32(moe(x), expected)
            moe.e_score_correction_bias[0] += 10.0  # the bias changes the choice: expert 0 everywhere
            assert_not_close_f32(moe(x), expected)
            assert moe.counts[0] == tokens
            moe.e_score_correction_bias[0] -= 10.0


# ----------------------------------------------------------------------------- against transformers' routers


def _hf_moe_config(cls, moe: MoE, **extra):
    return cls(hidden_size=32, num_experts_per_tok=moe.top_k, hidden_act="silu", **extra)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_block_equals_transformers_qwen3_moe_and_mixtral(family):
    transformers = pytest.importorskip("transformers")
    moe = _moe(moe_norm_topk_prob=family == "mixtral")
    with torch.no_grad():
        moe.e_score_correction_bias.zero_()  # these families have no routing bias
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        hf_cfg = _hf_moe_config(transformers.Qwen3MoeConfig, moe, num_experts=5, moe_intermediate_size=12,
                                norm_topk_prob=False)  # fmt: skip
        theirs = Qwen3MoeSparseMoeBlock(hf_cfg)
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        hf_cfg = _hf_moe_config(transformers.MixtralConfig, moe, num_local_experts=5, intermediate_size=12)
        theirs = MixtralSparseMoeBlock(hf_cfg)
    state = {k: v for k, v in moe.state_dict().items() if k != "e_score_correction_bias"}
    theirs.load_state_dict(state)  # the same names and 3-D layout as transformers 5's modules
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        assert_close_f32(moe(x), theirs(x))


def assert_same_routing(moe, theirs, x) -> None:
    """The experts each token of x (B, T, C) goes to and their weights, ours and a DeepseekV3MoE's (no grad)."""
    _, weights, chosen = theirs.gate(x)
    order = chosen.argsort(dim=-1)  # DeepSeek's top-k is unsorted
    _, our_chosen, our_weights = moe.route(x.view(-1, x.size(-1)))
    our_order = our_chosen.argsort(dim=-1)
    assert torch.equal(our_chosen.gather(1, our_order), chosen.gather(1, order))
    assert_close_f32(our_weights.gather(1, our_order), weights.gather(1, order))


def deepseek_v3_moe_state(moe) -> dict:
    """This MoE block's weights under transformers' DeepseekV3MoE names."""
    shared = {"gate_proj": "c_gate", "up_proj": "c_fc", "down_proj": "c_proj"}
    state = {k: v for k, v in moe.state_dict().items() if not k.startswith("shared_experts.")}
    state |= {f"shared_experts.{h}.weight": moe.shared_experts.get_submodule(o).weight for h, o in shared.items()}
    state["gate.e_score_correction_bias"] = state.pop("e_score_correction_bias")
    return state


def test_sigmoid_router_with_correction_bias_and_shared_experts_equal_deepseek_v3():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    moe = _moe(moe_router="sigmoid", n_shared_experts=1)
    hf_cfg = _hf_moe_config(transformers.DeepseekV3Config, moe, n_routed_experts=5, moe_intermediate_size=12,
                            n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                            norm_topk_prob=True)  # fmt: skip
    theirs = DeepseekV3MoE(hf_cfg)
    theirs.load_state_dict(deepseek_v3_moe_state(moe))
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        assert_close_f32(moe(x), theirs(x))
        assert_same_routing(moe, theirs, x)


def test_aux_loss_equals_transformers_and_its_gradient_reaches_the_router():
    pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model = _model(**LLAMA, **MOE, moe_layers="1", moe_aux_loss_coef=0.01, moe_norm_topk_prob=False).train()
    x = torch.randint(0, 97, (2, 16))
    moe = model.transformer.h[1].mlp
    seen = []
    moe.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))  # what the router reads
    _, loss = model(x, x)
    expected = load_balancing_loss_func((moe.gate(seen[0]).view(-1, 5),), 5, 2)
    assert_close_f32(moe.aux_loss, expected)
    model.eval()
    plain = model(x, x)[1]
    assert_close_f32(loss, plain + 0.01 * expected, scale=plain.item())
    assert_not_close_f32(loss, plain, scale=plain.item())
    model.train()
    model(x, x)
    model.with_aux_loss(torch.zeros(())).backward()  # the auxiliary loss alone
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.down_proj.grad is None  # it trains the router only


# ----------------------------------------------------------------------------- the model around it


def test_kv_cache_decoding_equals_the_full_forward():
    model = _model(**LLAMA, **MOE, n_shared_experts=1, moe_layers="every_other", moe_router="sigmoid")
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
    assert_close_f32(cached_decoding(model, idx), full)  # a prefill of 5, then one token at a time


def test_fused_loss_padded_vocab_and_recompute_give_the_plain_loss_gradients_and_loads():
    x = torch.randint(0, 97, (2, 16))
    results = []
    plain = _model(**LLAMA, **MOE, moe_aux_loss_coef=0.01).state_dict()
    for chunk, recompute, padded in ((0, False, None), (7, True, 128)):
        model = _model(**LLAMA, **MOE, moe_aux_loss_coef=0.01, padded_vocab_size=padded).train()
        with torch.no_grad():  # the same weights; padded rows of the embedding and head stay as initialised
            for name, tensor in model.state_dict().items():
                tensor[: plain[name].size(0)] = plain[name]
        model.ce_chunk_size, model.activation_checkpointing = chunk, recompute
        _, loss = model(x, x)
        loss.backward()
        grads = {n: p.grad[:97] if "wte" in n or "lm_head" in n else p.grad for n, p in model.named_parameters()}
        model.update_moe_bias()
        results.append((loss.detach(), grads, torch.stack([m.last_load for m in model.moe_layers()])))
    (loss_a, grads_a, load_a), (loss_b, grads_b, load_b) = results
    assert_close_f32(loss_b, loss_a)
    for name, grad in grads_a.items():
        assert_close_f32(grads_b[name], grad, terms=32, msg=name)
    assert torch.equal(load_b, load_a) and load_a.sum(dim=1).tolist() == [2 * 16 * 2] * 2  # recompute: counted once


def test_flops_per_token_count_the_active_experts_only():
    """k of E experts of hidden H/k compute what one dense SwiGLU of hidden H computes, plus the router."""
    dense = GPT(GPTConfig(**BASE, **{**LLAMA, "mlp_hidden": 48}))
    moe = GPT(GPTConfig(**BASE, **{**LLAMA, "mlp_hidden": 48}, n_experts=8, experts_per_token=2))
    assert moe.config.expert_hidden == 24
    assert moe.num_params() > 3 * dense.num_params() // 2  # all experts are parameters ...
    router = 2 * 8 * 32  # ... but only the router and k experts are FLOPs
    assert moe.flops_per_token(16) == dense.flops_per_token(16) + 6 * router


def test_compiled_training_step_equals_eager():
    x = torch.randint(0, 97, (2, 16))
    losses = []
    for compiled in (False, True):
        model = _model(**LLAMA, **{**MOE, "moe_bias_update_rate": 0.01}, moe_aux_loss_coef=0.01).train()
        step = torch.compile(model, backend="aot_eager") if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            _, loss = step(x, x)
            loss.backward()
            opt.step()
            model.update_moe_bias()
            losses.append(loss.item())
        assert model.moe_layers()[0].e_score_correction_bias.abs().sum() > 0
    assert_close_f32(losses[3:], losses[:3], scale=max(losses))


def test_bias_update_balances_the_expert_load():
    """A tiny run started from a skewed router (every token shares one direction): max/mean expert load."""
    update_on = _balance_run(rate=0.003)
    update_off = _balance_run(rate=0.0)
    start = sum(update_off[:5]) / 5
    on, off = sum(update_on[-10:]) / 10, sum(update_off[-10:]) / 10  # the last 10 of 40 steps
    assert start > 3.0  # imbalanced at the start: the busiest expert takes 3x its share
    assert on < 1.4 and on < off - 0.3, (on, off)  # measured: 1.28 with the update, 1.83 without


def _balance_run(rate: float, steps: int = 40) -> list[float]:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_experts=8, experts_per_token=2,
                    mlp="swiglu", norm="rmsnorm", pos_embedding="rope", bias=False,
                    moe_bias_update_rate=rate)  # fmt: skip
    model = GPT(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.05 * torch.randn(32))  # a shared direction: some experts win every token
        for moe in model.moe_layers():
            moe.gate.weight.mul_(5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    data = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(steps):
        x = torch.randint(0, 64, (16, 32), generator=data)
        opt.zero_grad()
        model(x, x)[1].backward()
        opt.step()
        model.update_moe_bias()
        ratios.append(model.moe_stats()["moe_load_max_over_mean"])
    return ratios


def test_bad_moe_configs_are_refused_naming_the_field():
    for bad, field in [(dict(experts_per_token=5), "model.experts_per_token"), (dict(n_experts=-1), "model.n_experts"),
                       (dict(moe_router="relu"), "model.moe_router"), (dict(moe_layers="0,7"), "model.moe_layers"),
                       (dict(moe_layers="odd"), "model.moe_layers"), (dict(moe_hidden=0), "model.moe_hidden"),
                       (dict(n_shared_experts=-1), "model.n_shared_experts"),
                       (dict(moe_bias_update_rate=-0.1), "model.moe_bias_update_rate")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            GPTConfig(**{**BASE, "n_experts": 4, **bad})
    assert GPTConfig(**{**BASE, "n_layer": 5}, n_experts=4, moe_layers="every_other").moe_layer_ids == (1, 3)
    assert GPTConfig(**BASE, n_experts=4, moe_layers="1").moe_layer_ids == (1,)
    assert GPTConfig(**BASE).moe_layer_ids == ()


# ----------------------------------------------------------------------------- Hugging Face, both ways


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_export_and_import_qwen3_moe_and_mixtral_both_ways(family, tmp_path, capsys):
    """gpt2lab -> export -> transformers' Auto class -> save_pretrained -> gpt2lab: same logits, same greedy tokens."""
    transformers = pytest.importorskip("transformers")
    from gpt2lab.cli.main import main
    from gpt2lab.inference.generate import generate_ids
    from gpt2lab.interop.hf import from_hf_state_dict
    from gpt2lab.interop.load import load_model

    qwen = family == "qwen3_moe"
    switches = dict(qk_norm=True, moe_layers="1,2", moe_norm_topk_prob=False) if qwen else dict(tie_embeddings=True)
    ours = _model(**{**LLAMA, **MOE, "n_layer": 3, **switches})
    save_model(ours, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert f"{'Qwen3MoeForCausalLM' if qwen else 'MixtralForCausalLM'} folder" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == ("Qwen3MoeForCausalLM" if qwen else "MixtralForCausalLM")
    if qwen:
        assert theirs.config.mlp_only_layers == [0] and not theirs.config.norm_topk_prob
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = ours(idx)[0]
        assert_close_f32(theirs(idx).logits, expected)
        theirs.save_pretrained(tmp_path / "back")  # transformers' own files, read back by gpt2lab
        back = load_model(str(tmp_path / "back"))
        unused = {} if qwen else {"mlp_hidden": ours.config.mlp_hidden}  # Mixtral: no dense MLP, no dense width
        assert dataclasses.replace(back.config, **unused) == ours.config
        assert_close_f32(back(idx)[0], expected)
        in_memory = from_hf_state_dict(theirs.state_dict(), back.config, "memory")  # transformers 5's fused experts
        assert_close_f32(in_memory(idx)[0], expected)
        back.transformer.h[2].mlp.experts.down_proj[3, 0, 0] += 0.5  # one expert weight astray shows
        assert_not_close_f32(back(idx)[0], expected)
        out = theirs.generate(idx[:1, :6], max_new_tokens=20, do_sample=False, attention_mask=torch.ones(1, 6))
    tokens = generate_ids(ours, idx[0, :6].tolist(), max_new_tokens=20, temperature=0, eos_id=None)[0]
    assert tokens == out[0, 6:].tolist()


def test_export_refuses_what_no_moe_class_implements(tmp_path):
    from gpt2lab.errors import Gpt2LabError
    from gpt2lab.interop.hf import export_hf

    for switches, named in [(dict(moe_router="sigmoid"), "model.moe_router=sigmoid"),
                            (dict(n_shared_experts=1), "model.n_shared_experts=1"),
                            (dict(moe_layers="1"), "model.moe_layers=1 without model.qk_norm"),
                            (dict(mlp="gelu", moe_layers="1", qk_norm=True), "model.mlp=gelu")]:  # fmt: skip
        with pytest.raises(Gpt2LabError, match=named):
            export_hf(_model(**{**LLAMA, **MOE, **switches}), tmp_path / "out")
    trained = _model(**LLAMA, **MOE)
    with torch.no_grad():
        trained.transformer.h[0].mlp.e_score_correction_bias[1] = 0.01
    with pytest.raises(Gpt2LabError, match="trained routing bias"):
        export_hf(trained, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the training loop


MOE_SETS = ["model.n_experts=4", "model.experts_per_token=2", "model.n_shared_experts=1", "model.moe_layers=1",
            "model.moe_bias_update_rate=0.01", "model.moe_aux_loss_coef=0.01", "model.mlp=swiglu"]  # fmt: skip


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def test_train_with_experts_resumes_bit_exactly(tmp_path, shakespeare_data):  # noqa: F811
    """8 steps straight = 4 steps, resume, 4 steps: the same losses, loads and routing biases, to the bit."""
    from gpt2lab.checkpoint.folder import find_latest, load_model
    from gpt2lab.cli.main import main

    cfg = write_config(tmp_path, shakespeare_data, train={"max_steps": 8, "save_every": 0}, optim={"decay_steps": 8})
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert main(["train", str(cfg), "--run-dir", straight, *_sets(MOE_SETS)]) == 0
    assert main(["train", str(cfg), "--run-dir", resumed, *_sets(MOE_SETS + ["train.max_steps=4"])]) == 0
    assert main(["train", "--resume", resumed, "--set", "train.max_steps=8"]) == 0
    for key in ("train_loss", "val_loss", "grad_norm", "moe_load_max_over_mean", "moe_load"):
        assert read_metrics(tmp_path / "resumed", key) == read_metrics(tmp_path / "straight", key), key
    assert sorted(read_metrics(tmp_path / "resumed", "moe_load")) == list(range(1, 9))
    bias = [load_model(find_latest(run)).transformer.h[1].mlp.e_score_correction_bias for run in (straight, resumed)]
    assert torch.equal(bias[0], bias[1]) and bias[0].abs().sum() > 0  # the bias moved, and was saved
    record = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-2])
    assert len(record["moe_load"]) == 1 and len(record["moe_load"][0]) == 4  # one MoE block, 4 experts


def test_the_cli_trains_samples_and_explains_export_of_an_moe_run(tmp_path, shakespeare_data, capsys):  # noqa: F811
    """`gpt2lab train configs/shakespeare.toml --set model.n_experts=4 ...`, then sample, then export."""
    from gpt2lab.cli.main import main
    from tests.conftest import REPO

    sets = ["data.path=" + str(shakespeare_data), "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
            "model.block_size=32", "train.max_steps=3", "train.total_batch=256", "train.micro_batch=4",
            "train.device=cpu", "eval.val_every=0", "eval.sample_every=0", "log.tensorboard=false",
            "model.n_experts=4", "perf.activation_checkpointing=true"]  # fmt: skip
    run = tmp_path / "run"
    assert main(["train", str(REPO / "configs" / "shakespeare.toml"), "--run-dir", str(run), *_sets(sets)]) == 0
    assert "moe max/mean" in capsys.readouterr().out
    assert main(["sample", "--model", str(run), "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["export", str(run), str(tmp_path / "hf")]) == 2  # GPT-2 + experts: no HF class
    err = capsys.readouterr().err
    assert "model.pos_embedding=learned" in err and "no Hugging Face equivalent" in err


def test_ddp_ranks_share_the_loads_and_match_one_process(tmp_path, shakespeare_data):  # noqa: F811
    """2 gloo ranks x micro-batch 2 == 1 process accumulating 2 x 2: the logged loads are the whole batch's."""
    import os
    import subprocess
    import sys

    from gpt2lab.checkpoint import folder as ckpt
    from gpt2lab.cli.main import main
    from tests.conftest import REPO

    moe = {"n_experts": 4, "moe_bias_update_rate": 0.01, "mlp": "swiglu"}
    cfg = write_config(tmp_path, shakespeare_data, model=moe, eval={"val_every": 0},
                       train={"max_steps": 3, "total_batch": 128, "micro_batch": 2, "save_every": 0})  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2lab",
         "train", str(cfg), "--run-dir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stdout[-1500:] + ddp.stderr[-3000:]  # how far each rank got, and why it stopped
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "one")]) == 0
    assert read_metrics(tmp_path / "ddp", "moe_load") == read_metrics(tmp_path / "one", "moe_load")
    one, two = (ckpt.load_model(ckpt.find_latest(tmp_path / run)) for run in ("one", "ddp"))
    for a, b in zip(one.moe_layers(), two.moe_layers(), strict=True):
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias) and b.e_score_correction_bias.any()
