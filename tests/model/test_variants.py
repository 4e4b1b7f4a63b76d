"""The [model] switches beyond GPT-2: each variant decodes with its KV cache, trains, and the
Llama/Qwen3-shaped ones compute exactly what transformers' own classes compute."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.checkpoint.folder import load_model, save_model
from gpt2lab.inference.kv_cache import KVCache
from gpt2lab.interop.llama import to_hf_state_dict
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from tests.conftest import (
    assert_close_f32,
    assert_fused_loss_and_recompute_match_plain,
    assert_not_close_f32,
    cached_decoding,
)

BASE = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32)
VARIANTS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "rope": dict(pos_embedding="rope"),
    "qk_norm": dict(qk_norm=True, pos_embedding="rope"),
    "swiglu": dict(mlp="swiglu", mlp_hidden=48),
    "relu2": dict(mlp="relu2"),
    "gqa": dict(n_kv_head=2, pos_embedding="rope"),
    "mqa": dict(n_kv_head=1),
    "no_bias_untied": dict(bias=False, tie_embeddings=False),
    "modern": dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", n_kv_head=2, bias=False),
}
LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=40, bias=False, tie_embeddings=False,
             n_kv_head=2, rope_theta=500.0, layer_norm_epsilon=1e-6)  # fmt: skip


def _model(**switches) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **switches})).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm applied in the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "q_norm.weight", "k_norm.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decoding_equals_the_full_forward(name):
    model = _model(**VARIANTS[name])
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
    assert_close_f32(cached_decoding(model, idx), full)  # a prefill of 5, then one token at a time


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_trains_saves_and_loads(name, tmp_path):
    model = _model(**VARIANTS[name]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 97, (4, 16))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses  # it learns to copy its input
    model.eval()
    back = load_model(save_model(model, tmp_path / "ckpt"))
    assert back.config == model.config
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])


def test_fused_loss_and_recompute_give_the_plain_loss_and_gradients():
    """perf.ce_chunk_size and perf.activation_checkpointing on a RoPE, GQA, untied variant."""
    x = torch.randint(0, 97, (2, 16))
    assert_fused_loss_and_recompute_match_plain(lambda: _model(**VARIANTS["modern"], tie_embeddings=False), x)


def test_gpt2_defaults_build_exactly_gpt2():
    names = set(GPT(GPTConfig(**BASE)).state_dict())
    assert "transformer.wpe.weight" in names and "transformer.h.0.ln_1.bias" in names
    assert not any("norm" in n or "gate" in n for n in names)


def test_bad_switches_are_refused_naming_the_field():
    for bad, field in [(dict(norm="batchnorm"), "model.norm"), (dict(mlp="tanh"), "model.mlp"),
                       (dict(n_kv_head=3), "n_kv_head"), (dict(pos_embedding="alibi"), "model.pos_embedding"),
                       (dict(n_embd=36, n_head=4, pos_embedding="rope"), "even head size")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            GPTConfig(**{**BASE, **bad})


def test_the_issue_command_trains_a_modern_variant(tmp_path, capsys):
    """`gpt2lab train ... --set model.pos_embedding=rope --set model.norm=rmsnorm ...`, then sampling from it."""
    from gpt2lab.cli.main import main
    from tests.train.test_loop import TINY, write_config

    data = tmp_path / "data"
    from gpt2lab.data.prepare import Settings, prepare

    prepare(Settings("shakespeare", shard_size=10_000_000), data, workers=1)
    cfg = write_config(tmp_path, data, train={**TINY["train"], "max_steps": 3, "save_every": 0})
    sets = ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.qk_norm=true", "model.mlp=relu2"]
    argv = ["train", str(cfg), "--run-dir", str(tmp_path / "run")]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    capsys.readouterr()
    assert main(["sample", "--model", str(tmp_path / "run"), "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2  # no GPT-2 form: one clear error
    err = capsys.readouterr().err
    assert "model.mlp=relu2" in err and "no Hugging Face equivalent" in err
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- parity with transformers


def _hf_config(cls, model: GPT, **extra):
    cfg = model.config
    return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden,
               num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
               max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.layer_norm_epsilon, rope_theta=cfg.rope_theta,
               tie_word_embeddings=False, attention_bias=False, **extra)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_logits_equal_transformers_llama_and_qwen3(family):
    transformers = pytest.importorskip("transformers")
    ours = _model(**LLAMA, qk_norm=family == "qwen3")
    if family == "llama":
        hf_cfg = _hf_config(transformers.LlamaConfig, ours, head_dim=ours.config.head_size, mlp_bias=False)
        ref = transformers.LlamaForCausalLM(hf_cfg)
    else:
        hf_cfg = _hf_config(transformers.Qwen3Config, ours, head_dim=ours.config.head_size)
        ref = transformers.Qwen3ForCausalLM(hf_cfg)
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    ref.eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = ref(idx).logits
        actual, _ = ours(idx)
        assert_close_f32(actual, expected)
        ours.transformer.h[1].attn.c_attn.weight[0, 0] += 0.05  # a realistic slip in one weight shows
        assert_not_close_f32(ours(idx)[0], expected)


@pytest.mark.parametrize("name", ["modern", "gqa", "no_bias_untied"])
def test_static_cache_decoding_gives_the_eager_tokens(name):
    from gpt2lab.inference.generate import generate_ids

    model = _model(**VARIANTS[name])
    kw = dict(num_samples=2, max_new_tokens=10, temperature=0, eos_id=None)
    eager = generate_ids(model, [1, 2, 3], decode="eager", **kw)
    assert generate_ids(model, [1, 2, 3], decode="static", **kw) == eager and len(eager[0]) == 10


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen3", True)])
def test_export_and_import_llama_and_qwen3_both_ways(family, tied, tmp_path, capsys):
    """gpt2lab -> export -> transformers' Auto class, and a transformers folder -> gpt2lab: the same logits."""
    transformers = pytest.importorskip("transformers")
    from gpt2lab.cli.main import main
    from gpt2lab.interop.load import load_model as load_any

    ours = _model(**{**LLAMA, "qk_norm": family == "qwen3", "tie_embeddings": tied})
    save_model(ours, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert f"{'Qwen3' if family == 'qwen3' else 'Llama'}ForCausalLM folder" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__.lower().startswith(family)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = ours(idx)[0]
        assert_close_f32(theirs(idx).logits, expected)
        theirs.save_pretrained(tmp_path / "back")  # transformers' own files, read back by gpt2lab
        capsys.readouterr()
        back = load_any(str(tmp_path / "back"))
        assert "97-token vocabulary, not GPT-2's" in capsys.readouterr().err  # says its tokenizer is not ours
        assert back.config.qk_norm == (family == "qwen3") and back.config.kv_heads == 2
        assert_close_f32(back(idx)[0], expected)


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_rope_scaling_frequencies_equal_transformers(kind):
    """RoPE's inverse frequencies and YaRN's attention factor, against transformers' own functions."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from gpt2lab.interop.llama import rope_parameters
    from gpt2lab.model.rope import rope_frequencies

    config = GPTConfig(**{**BASE, **LLAMA, "n_embd": 128, "n_head": 2, "rope_theta": 10000.0, "block_size": 2048,
                          "rope_scaling": kind, "rope_factor": 4.0, "rope_original_context": 512})  # fmt: skip
    hf = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=2048,
                                  rope_parameters=rope_parameters(config))  # fmt: skip
    expected, expected_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    actual, factor = rope_frequencies(config)
    assert_close_f32(actual, expected)
    # Plain floats: pytest 9's approx no longer takes 0-d tensors.
    assert float(factor) == pytest.approx(float(expected_factor), rel=1e-12)
    plain, _ = rope_frequencies(GPTConfig(**{**BASE, **LLAMA, "n_embd": 128, "n_head": 2, "rope_theta": 10000.0}))
    assert_not_close_f32(actual, plain)  # the scaling changes something
    if kind == "yarn":  # the fastest dimensions keep their frequency, the slowest are divided by the factor
        assert actual[0] == plain[0] and factor > 1
        assert float(actual[-1]) == pytest.approx(float(plain[-1]) / 4, rel=1e-6)


def test_yarn_model_exports_and_matches_transformers_past_its_trained_context(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt2lab.interop.hf import export_hf
    from gpt2lab.interop.load import load_model as load_any

    ours = _model(**{**LLAMA, "rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_context": 8})
    export_hf(ours, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 97, (1, 30))  # 30 positions: far past the original 8
    with torch.no_grad():
        expected = ours(idx)[0]
        assert_close_f32(theirs(idx).logits, expected)
        back = load_any(str(tmp_path / "hf"))
        assert (back.config.rope_scaling, back.config.rope_factor, back.config.rope_original_context) == ("yarn", 4, 8)
        assert_close_f32(back(idx)[0], expected)


def test_sample_reads_past_the_trained_context_with_yarn(tmp_path, capsys):
    """`gpt2lab sample --context N --rope-scaling yarn` on a RoPE model; a learned-position model refuses."""
    from gpt2lab.cli.main import main

    rope = _model(**{**BASE, "vocab_size": 50257, "pos_embedding": "rope", "block_size": 16})
    save_model(rope, tmp_path / "rope")
    argv = ["sample", "--model", str(tmp_path / "rope"), "--prompt", "Hello " * 10, "--max-new-tokens", "30"]
    assert main(argv + ["--context", "64", "--rope-scaling", "yarn", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "sliding window" not in err and len(out) > len("Hello " * 10)  # 10 + 30 tokens fit in 64
    assert main(argv + ["--temperature", "0"]) == 0  # without it: the trained 16 tokens, a sliding window
    assert "sliding window" in capsys.readouterr().err
    save_model(_model(**{**BASE, "vocab_size": 50257}), tmp_path / "learned")
    assert main(["sample", "--model", str(tmp_path / "learned"), "--context", "64"]) == 2
    assert "learned position embeddings" in capsys.readouterr().err


def test_every_preset_loads_and_the_modern_one_is_a_modern_network():
    from gpt2lab.config import load_config
    from tests.conftest import REPO

    presets = sorted((REPO / "configs").glob("*.toml"))
    assert len(presets) >= 4
    configs = {p.stem: load_config(p) for p in presets}  # a bad key or value in any preset raises here
    modern = configs["modern-124m"].model
    assert (modern.pos_embedding, modern.norm, modern.mlp, modern.kv_heads) == ("rope", "rmsnorm", "relu2", 4)
    with torch.device("meta"):
        n = GPT(modern).num_params()
    assert 100e6 < n < 180e6  # a 124M-class model (untied head: more parameters, the same compute per layer)


def test_logit_softcap_bounds_the_logits_wherever_they_are_computed():
    """Gemma 2's cap * tanh(z / cap): the forward, the fused loss and its gradients, decoding, the evaluations."""
    from gpt2lab.eval.common import score_batch
    from gpt2lab.inference.generate import head_for_decoding, last_logits
    from gpt2lab.interop.hf import check_gpt2
    from gpt2lab.interop.llama import family

    cap, x = 2.0, torch.randint(0, 97, (2, 16))
    model = _model(logit_softcap=cap, **LLAMA)  # a Llama but for the cap
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # raw logits far beyond the cap
        logits, _ = model(x)
        raw = model.lm_head(model.forward_hidden(x))[..., :97]
        assert raw.abs().max() > 3 * cap and logits.abs().max() <= cap
        assert_close_f32(logits, cap * torch.tanh(raw / cap))
        decoded = last_logits(model, x, KVCache(model.config, 2, 16), head_for_decoding(model, 1))
        assert_close_f32(decoded, logits[:, -1])
        ctx, cont = x[0, :10].tolist(), x[0, 10:].tolist()  # an evaluation's continuation loss
        expected = torch.nn.functional.cross_entropy(logits[0, 9:15], x[0, 10:], reduction="sum")
        assert_close_f32(score_batch(model, [(ctx, cont)], "cpu").sum_loss[0], expected, terms=6)
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        model.ce_chunk_size = chunk
        _, loss = model.train()(x, x)
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone(), model.transformer.wte.weight.grad.clone()))
    assert_close_f32(results[1][0], results[0][0])
    assert_close_f32(results[1][1], results[0][1], terms=32)
    assert_close_f32(results[1][2], results[0][2], terms=32)
    with pytest.raises(Exception, match="logit_softcap"):
        check_gpt2(model.config)
    assert family(model.config) is None  # a Llama with a soft cap is no Llama
