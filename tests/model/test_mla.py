"""Multi-head latent attention (model.attention = "mla"): its absorbed decoding computes its naive forward,
its KV cache holds only the latent and the RoPE key, and it computes what transformers' DeepseekV3 computes."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2lab.checkpoint.folder import save_model
from gpt2lab.inference.kv_cache import KVCache
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from tests.conftest import REPO, assert_close_f32, assert_not_close_f32, cached_decoding, tiny_deepseek_v3

# odd shapes: 3 heads of 12, nope 5, rope 6, v 7, latent 10 (query latent 14 where used)
BASE = dict(block_size=32, vocab_size=97, n_layer=2, n_head=3, n_embd=36)
MLA = dict(attention="mla", pos_embedding="rope", kv_lora_rank=10, qk_nope_head_dim=5, qk_rope_head_dim=6, v_head_dim=7)
DEEPSEEK = dict(norm="rmsnorm", mlp="swiglu", mlp_hidden=40, bias=False, tie_embeddings=False, rope_theta=500.0,
                layer_norm_epsilon=1e-6)  # fmt: skip


def _model(**switches) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **MLA, **switches})).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm applied in the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("norm" in name or "ln_" in name):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("q_lora_rank", [0, 14])
@pytest.mark.parametrize("static", [False, True])
def test_absorbed_decoding_equals_the_naive_forward(q_lora_rank, static):
    """The full forward is the naive form (keys, values decompressed); cached decoding the absorbed one."""
    model = _model(q_lora_rank=q_lora_rank, bias=True)  # biases on the projections of x too
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        assert_close_f32(cached_decoding(model, idx, max_len=16, static=static), full)  # prefill 5, then 1 by 1
        w = model.transformer.h[1].attn.kv_b_proj.weight
        w[0, 0] += 0.05  # a slip in W_uk shows in either form (the comparison bites)
        assert_not_close_f32(model(idx)[0], full)


def test_the_cache_holds_only_the_latent_and_the_rope_key():
    model = _model()
    cache = KVCache(model.config, batch_size=2, max_len=16)
    assert cache.k.shape == (2, 2, 1, 16, 10) and cache.v.shape == (2, 2, 1, 16, 6)  # (L, B, 1, max_len, r / dr)
    assert cache.bytes_per_token == 2 * (10 + 6) * 4  # n_layer x (kv_lora_rank + qk_rope_head_dim) x float32
    latents = []
    hook = model.transformer.h[0].attn.kv_a_layernorm.register_forward_hook(lambda m, i, out: latents.append(out))
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 7)), kv_cache=cache)
    hook.remove()
    assert torch.equal(cache.k[0, :, 0, :7], latents[0])  # what is cached is the normalised latent itself
    assert cache.k[:, :, :, 7:].abs().sum() == 0 and cache.v[:, :, :, 7:].abs().sum() == 0


def test_gpt2_124m_against_mla_of_the_same_width_in_kv_cache_bytes():
    """bfloat16: 12 layers x 12 heads x (64 + 64) x 2 bytes, against 12 layers x (192 + 32) x 2 bytes."""
    gpt2 = GPTConfig.from_preset("gpt2")
    mla = GPTConfig.from_preset("gpt2", attention="mla", pos_embedding="rope")  # derived dims: 192 latent, 32 RoPE
    assert mla.kv_cache_dims == (1, 192, 32)
    mha_bytes = KVCache(gpt2, 1, 1, device="meta", dtype=torch.bfloat16).bytes_per_token
    mla_bytes = KVCache(mla, 1, 1, device="meta", dtype=torch.bfloat16).bytes_per_token
    assert (mha_bytes, mla_bytes) == (12 * 12 * 128 * 2, 12 * 224 * 2) == (36_864, 5_376)


def test_flops_per_token_count_what_mla_computes():
    """Against torch's own FLOP counter on a training step: every matmul, the attention's included."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(q_lora_rank=14, bias=False)
    idx = torch.randint(0, 97, (1, 32))
    with FlopCounterMode(display=False) as counter:
        model(idx)[0].sum().backward()
    norm_weights = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or "ln_" in n)  # not matmuls
    assert counter.get_total_flops() / 32 == model.flops_per_token(32) - 6 * norm_weights


def test_fused_loss_and_recompute_give_the_plain_loss_and_gradients():
    x = torch.randint(0, 97, (2, 16))
    results = []
    for chunk, recompute in ((0, False), (7, True)):
        model = _model(q_lora_rank=14, **DEEPSEEK).train()
        model.ce_chunk_size, model.activation_checkpointing = chunk, recompute
        _, loss = model(x, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert_close_f32(loss_b, loss_a)
    assert all(grad.abs().sum() > 0 for grad in grads_a.values())  # every MLA weight learns
    for name, grad in grads_a.items():
        assert_close_f32(grads_b[name], grad, terms=32, msg=name)


@pytest.mark.parametrize(
    "bad, field",
    [(dict(attention="latent"), "model.attention"), (dict(pos_embedding="learned"), "model.pos_embedding=rope"),
     (dict(n_kv_head=1), "model.n_kv_head"), (dict(qk_norm=True), "model.qk_norm"),
     (dict(kv_lora_rank=0), "model.kv_lora_rank"), (dict(kv_lora_rank=37), "model.kv_lora_rank"),
     (dict(q_lora_rank=-1), "model.q_lora_rank"), (dict(q_lora_rank=40), "model.q_lora_rank"),
     (dict(qk_rope_head_dim=5), "model.qk_rope_head_dim"), (dict(qk_nope_head_dim=0), "model.qk_nope_head_dim"),
     (dict(v_head_dim=0), "model.v_head_dim")],
)  # fmt: skip
def test_bad_mla_configs_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        GPTConfig(**{**BASE, **MLA, **bad})


# ----------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("q_lora_rank, tied", [(0, False), (14, True)])
def test_export_and_import_equal_transformers_deepseek_v3_both_ways(q_lora_rank, tied, tmp_path, capsys):
    """gpt2lab -> `gpt2lab export` -> DeepseekV3ForCausalLM, and its save_pretrained -> gpt2lab: the same logits,
    and greedy generation token for token (transformers decodes from its own latent cache)."""
    transformers = pytest.importorskip("transformers")
    from gpt2lab.cli.main import main
    from gpt2lab.inference.generate import generate_ids
    from gpt2lab.interop.load import load_model

    ours = _model(**{**DEEPSEEK, "q_lora_rank": q_lora_rank, "tie_embeddings": tied})
    save_model(ours, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert "DeepseekV3ForCausalLM folder" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(theirs, transformers.DeepseekV3ForCausalLM) and theirs.config.first_k_dense_replace == 2
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = ours(idx)[0]
        assert_close_f32(theirs(idx).logits, expected)
        theirs.save_pretrained(tmp_path / "back")
        back = load_model(str(tmp_path / "back"))
        assert back.config == ours.config
        assert_close_f32(back(idx)[0], expected)
        prompt = idx[0, :6].tolist()
        out = theirs.generate(idx[:1, :6], max_new_tokens=20, do_sample=False, attention_mask=torch.ones(1, 6))
    for decode in ("eager", "static"):
        tokens = generate_ids(ours, prompt, max_new_tokens=20, temperature=0, eos_id=None, decode=decode)[0]
        assert tokens == out[0, 6:].tolist()


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_a_folder_transformers_made_loads_with_its_own_weights(rope_interleave, tmp_path):
    """Weights initialised by transformers, in DeepSeek's interleaved RoPE layout or the half-split one."""
    transformers = pytest.importorskip("transformers")
    from gpt2lab.interop.hf import from_hf_state_dict
    from gpt2lab.interop.load import load_model

    config = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=36, intermediate_size=40, num_hidden_layers=2, first_k_dense_replace=2,
        num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=10, q_lora_rank=14, qk_nope_head_dim=5,
        qk_rope_head_dim=6, v_head_dim=7, max_position_embeddings=32, rope_interleave=rope_interleave,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, num_nextn_predict_layers=0,
    )  # fmt: skip
    torch.manual_seed(1)
    theirs = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(str(tmp_path / "hf"))
    assert ours.config.attention == "mla" and ours.config.mla_dims.q_lora_rank == 14
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = theirs(idx).logits
        assert_close_f32(ours(idx)[0], expected)
        state = {f"model.{k}" if not k.startswith("lm_head") else k: v for k, v in theirs.model.state_dict().items()}
        state["lm_head.weight"] = theirs.lm_head.weight
        wrong = from_hf_state_dict(state, ours.config, "x", rope_interleave=not rope_interleave)
        assert_not_close_f32(wrong(idx)[0], expected)  # the RoPE layout matters: the permutation is tested


def test_yarn_exports_as_deepseek_writes_it_and_matches_past_the_trained_context(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt2lab.interop.hf import export_hf
    from gpt2lab.interop.load import load_model

    ours = _model(**DEEPSEEK, rope_scaling="yarn", rope_factor=4.0, rope_original_context=8)
    export_hf(ours, tmp_path / "hf")
    params = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]
    assert (params["rope_type"], params["mscale"], params["mscale_all_dim"]) == ("yarn", 1.0, 1.0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 97, (1, 30))  # 30 positions: far past the original 8
    with torch.no_grad():
        expected = ours(idx)[0]
        assert_close_f32(theirs(idx).logits, expected)
        assert_close_f32(load_model(str(tmp_path / "hf"))(idx)[0], expected)
        ours.config.rope_scaling = "none"  # YaRN changes the function (frequencies and the softmax scale)
        assert_not_close_f32(ours(idx)[0], expected)


def test_what_deepseek_v3_cannot_hold_is_refused_both_ways(tmp_path, capsys):
    from gpt2lab.cli.main import main
    from gpt2lab.errors import Gpt2LabError
    from gpt2lab.interop.deepseek import config_to_hf as deepseek_config
    from gpt2lab.interop.hf import config_from_hf, config_to_hf, export_hf

    save_model(_model(mlp="gelu"), tmp_path / "gelu")  # MLA with GPT-2's MLP, LayerNorm and biases
    assert main(["export", str(tmp_path / "gelu"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.mlp=gelu" in err and "model.norm=layernorm" in err and "DeepseekV3ForCausalLM takes" in err
    for bad, message in [(dict(moe_router="softmax"), "model.moe_router=softmax"),
                         (dict(moe_layers="0"), "model.moe_layers=0")]:  # fmt: skip
        with pytest.raises(Gpt2LabError, match=message):  # DeepSeek-V3: sigmoid routing, MoE in the last blocks
            export_hf(_model(**{**DEEPSEEK, **MOE, **bad}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    good = deepseek_config(_model(**DEEPSEEK).config)
    for bad, message in [(dict(first_k_dense_replace=1, n_routed_experts=8), "model.moe_n_group=8 leaves 1 expert"),
                         (dict(first_k_dense_replace=1, n_routed_experts=8, n_group=3), "moe_n_group must divide"),
                         (dict(attention_bias=True), "attention_bias"),
                         (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 8, "mscale": 0.707,
                                                "mscale_all_dim": 0.707}), "mscale=0.707"),
                         (dict(qk_rope_head_dim=7), "qk_rope_head_dim")]:  # fmt: skip
        with pytest.raises(Gpt2LabError, match=message):
            config_from_hf(good | bad, "x/config.json")
    assert config_from_hf(good) == _model(**DEEPSEEK).config  # and the good one is the model's config
    assert "DeepseekV3" not in json.dumps(config_to_hf(_model().config))  # GPT-2's own writer is untouched


# ----------------------------------------------------------------------------- MLA + MoE: DeepSeek-V3's MoE blocks

MOE = dict(n_experts=5, experts_per_token=2, moe_hidden=12, moe_router="sigmoid")  # odd sizes


def _moe_model(**switches) -> GPT:
    """MLA + MoE with sharp router logits and a trained-looking routing bias (it must steer the choice only)."""
    model = _model(**{**DEEPSEEK, **MOE, **switches})
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.mul_(20)
            moe.e_score_correction_bias.copy_(0.1 * torch.randn(moe.n_experts))
    return model


@pytest.mark.parametrize("shared, moe_layers", [(1, "1"), (0, "all")])
def test_mla_with_moe_exports_and_imports_as_deepseek_v3(shared, moe_layers, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt2lab.inference.generate import generate_ids
    from gpt2lab.interop.hf import export_hf
    from gpt2lab.interop.load import load_model

    ours = _moe_model(n_shared_experts=shared, moe_layers=moe_layers)
    export_hf(ours, tmp_path / "hf")
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert theirs.config.first_k_dense_replace == (1 if moe_layers == "1" else 0)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = ours(idx)[0]
        assert_close_f32(theirs.eval()(idx).logits, expected)
        theirs.save_pretrained(tmp_path / "back")
        back = load_model(str(tmp_path / "back"))
        assert back.config == ours.config
        assert_close_f32(back(idx)[0], expected)
        for moe in ours.moe_layers():
            moe.e_score_correction_bias.zero_()  # the exported routing bias changes the choice
        assert_not_close_f32(ours(idx)[0], expected)
        out = theirs.generate(idx[:1, :6], max_new_tokens=12, do_sample=False, attention_mask=torch.ones(1, 6))
    tokens = generate_ids(back, idx[0, :6].tolist(), max_new_tokens=12, temperature=0, eos_id=None)[0]
    assert tokens == out[0, 6:].tolist()  # greedy, token for token


def test_a_deepseek_v3_moe_folder_transformers_made_loads(tmp_path):
    pytest.importorskip("transformers")
    from gpt2lab.interop.load import load_model

    theirs = tiny_deepseek_v3(2, n_routed_experts=6, n_group=2, topk_group=2, routed_scaling_factor=1.0,
                              norm_topk_prob=False)  # fmt: skip
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(str(tmp_path / "hf"))
    cfg = ours.config
    assert (cfg.n_experts, cfg.experts_per_token, cfg.moe_layers, cfg.moe_router, cfg.moe_norm_topk_prob) == (
        6, 3, "1,2", "sigmoid", False)  # fmt: skip
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert_close_f32(ours(idx)[0], theirs(idx).logits)


# ----------------------------------------------------------------------------- the command line


def test_train_sample_and_bench_an_mla_model_from_the_command_line(tmp_path, capsys):
    """`gpt2lab train configs/shakespeare.toml --set model.attention=mla ...`, `sample` of it, and `bench sample`
    printing each model's KV-cache bytes per token: fewer for MLA than for its multi-head twin."""
    pytest.importorskip("transformers")
    from gpt2lab.cli.main import main
    from gpt2lab.data.prepare import Settings, prepare

    data = tmp_path / "data"
    prepare(Settings("shakespeare", shard_size=10_000_000), data, workers=1)
    sets = {"model.attention": "mla", "model.pos_embedding": "rope", "model.n_layer": 2, "model.n_embd": 32,
            "model.block_size": 32, "model.kv_lora_rank": 12, "model.q_lora_rank": 16, "data.path": data,
            "train.max_steps": 3, "train.total_batch": 128, "train.micro_batch": 4, "train.device": "cpu",
            "train.save_every": 0, "eval.val_every": 3, "eval.val_batches": 1, "log.tensorboard": "false"}  # fmt: skip
    argv = ["train", str(REPO / "configs" / "shakespeare.toml"), "--run-dir", str(tmp_path / "run")]
    assert main(argv + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]) == 0
    capsys.readouterr()
    assert main(["sample", "--model", str(tmp_path / "run"), "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["train", argv[1], "--set", "model.attention=mla"]) == 2  # learned positions: one error line
    assert "model.pos_embedding=rope" in capsys.readouterr().err

    for name, switches in (("mla", MLA), ("mha", dict(pos_embedding="rope"))):  # the same net but its attention
        torch.manual_seed(0)
        save_model(GPT(GPTConfig(**{**BASE, **DEEPSEEK, **switches})), tmp_path / name)
    printed = {}
    for name in ("mla", "mha"):
        argv = ["bench", "sample", "--model", str(tmp_path / name), "--new-tokens", "3", "--prompt-tokens", "4"]
        assert main(argv + ["--batch-sizes", "1", "--warmup", "0", "--repeats", "1"]) == 0
        out = capsys.readouterr().out
        assert "yes" in out  # greedy tokens equal transformers' (DeepseekV3 / Llama)
        printed[name] = int(out.split("KV cache: ")[1].split(" bytes per token")[0].replace(",", ""))
    # float32: n_layer x (kv_lora_rank + qk_rope_head_dim), against n_layer x n_head x 2 x head_size
    assert printed == {"mla": 2 * (10 + 6) * 4, "mha": 2 * 3 * (12 + 12) * 4}
