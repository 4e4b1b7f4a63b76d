"""`gpt2lab export CKPT OUT.gguf --format gguf`: transformers' GGUF loader (the reference for llama.cpp's layout) gives
the same logits, tokens and chat template; gguf.GGUFReader reads llama.cpp's metadata back."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2lab.chat.base import CHAT_VOCAB_SIZE
from gpt2lab.chat.template import CHAT_TEMPLATE, render_prompt
from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, save_model
from gpt2lab.cli.main import main
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop import llama as hf_llama
from gpt2lab.interop.gguf import export_gguf, gguf_tensors, gpt2_vocab, trained_vocab
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import SPECIAL_IDS, SPECIAL_TOKENS, TrainedTokenizer, get_tokenizer
from tests.conftest import assert_close_f32, assert_not_close_f32
from tests.interop.test_hf import random_ids

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers loads a .gguf file only with it

V = 50257  # GPT-2's tokenizer: llama.cpp wants a token for every embedding row
# transformers reads gpt2.context_length into n_ctx and leaves n_positions at 1024: GPT-2 files use that context
GPT2 = dict(block_size=1024, vocab_size=V, padded_vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
LLAMA = dict(block_size=64, vocab_size=V, padded_vocab_size=50304, n_layer=2, rope_theta=500.0, **hf_llama.REQUIRED)
# transformers' qwen3 GGUF config keeps Qwen3's head_dim of 128 (it reads no key_length): heads of 128
# (a tied GPT-2 goes through the CLI below; each load reads 100K strings of metadata: ~10 s)
FAMILIES = {
    "gpt2-untied": GPT2 | {"tie_embeddings": False},
    "llama-gqa": LLAMA | dict(n_head=4, n_kv_head=2, n_embd=32),
    "qwen3-untied": LLAMA | dict(n_head=2, n_kv_head=1, n_embd=256, qk_norm=True, tie_embeddings=False),
}


def random_model(**config) -> GPT:
    """A tiny model whose every weight matters to the logits (norms and biases away from 1 and 0)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p)) if p.dim() == 1 else p.mul_(10)
    return model


def logits_of(folder, name: str, idx: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    with torch.no_grad():
        return hf(idx).logits


def field(reader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_loads_in_transformers_with_the_same_logits(tmp_path, family):
    model = random_model(**FAMILIES[family])
    export_gguf(model, tmp_path / "m.gguf", gpt2_vocab(get_tokenizer()))
    idx = random_ids(V, (2, 24))
    with torch.no_grad():
        expected = model(idx)[0]
    assert_close_f32(logits_of(tmp_path, "m.gguf", idx), expected)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    arch = family.split("-")[0]
    assert field(reader, "general.architecture") == arch
    assert ("output.weight" in {t.name for t in reader.tensors}) == (not model.config.tie_embeddings)
    if arch != "gpt2":
        assert field(reader, f"{arch}.attention.head_count_kv") == model.config.kv_heads
        assert field(reader, f"{arch}.rope.freq_base") == 500.0


def test_llama_queries_and_keys_are_permuted_to_llama_cpps_rope_pairs(tmp_path):
    """Without convert_hf_to_gguf's permutation transformers (which undoes it) would rotate the wrong pairs."""
    model = random_model(**FAMILIES["llama-gqa"])
    tensors = gguf_tensors(model, "llama")
    q = model.transformer.h[0].attn.c_attn.weight[: model.config.n_embd].detach()
    assert not torch.equal(tensors["blk.0.attn_q.weight"], q)  # permuted rows
    assert torch.equal(tensors["blk.0.attn_q.weight"].sort(0).values, q.sort(0).values)  # the same rows
    qwen3 = random_model(**FAMILIES["qwen3-untied"])  # llama.cpp's qwen3 rotates halves, as gpt2lab: rows as they are
    q = qwen3.transformer.h[0].attn.c_attn.weight[: qwen3.config.n_embd].detach()
    assert torch.equal(gguf_tensors(qwen3, "qwen3")["blk.0.attn_q.weight"], q)


def test_gpt2_metadata_and_tokenizer_match_gpt2s(tmp_path, tokenizer):
    model = random_model(**GPT2)
    save_model(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out" / "m.gguf"), "--format", "gguf"]) == 0
    reader = gguf.GGUFReader(tmp_path / "out" / "m.gguf")
    expected = {"general.architecture": "gpt2", "gpt2.context_length": 1024, "gpt2.embedding_length": 32,
                "gpt2.feed_forward_length": 128, "gpt2.block_count": 2, "gpt2.attention.head_count": 2,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 50256,
                "tokenizer.ggml.eos_token_id": 50256, "tokenizer.ggml.add_bos_token": False}  # fmt: skip
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert len(field(reader, "tokenizer.ggml.tokens")) == V and len(field(reader, "tokenizer.ggml.merges")) == 50000
    assert "tokenizer.ggml.eot_token_id" not in reader.fields and "tokenizer.chat_template" not in reader.fields
    assert reader.get_tensor(0).name == "token_embd.weight" and tuple(reader.get_tensor(0).shape) == (32, V)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="m.gguf")
    for text in ["Hello world, it's 2024!\n\n  naïve café — 日本語 😀", " spaces   and\ttabs\r\n"]:
        assert hf_tok.encode(text) == tokenizer.encode_ordinary(text)
    idx = random_ids(V, (1, 16))
    with torch.no_grad():
        assert_close_f32(logits_of(tmp_path / "out", "m.gguf", idx), model(idx)[0])


def test_chat_model_carries_its_template_and_end_of_turn(tmp_path, tokenizer):
    model = random_model(**GPT2 | {"vocab_size": CHAT_VOCAB_SIZE, "n_layer": 1})
    save_model(model, tmp_path / "chat", extra={TRAIN_STATE_KEY: {"config": {"sft": {"data": "x.jsonl"}}}})
    assert main(["export", str(tmp_path / "chat"), str(tmp_path / "c.gguf"), "--format", "gguf"]) == 0
    reader = gguf.GGUFReader(tmp_path / "c.gguf")
    assert field(reader, "tokenizer.ggml.eot_token_id") == SPECIAL_IDS["<|assistant_end|>"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == 50256
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == CHAT_VOCAB_SIZE and tokens[V:] == list(SPECIAL_TOKENS)
    assert {types[i] for i in [50256, *SPECIAL_IDS.values()]} == {gguf.TokenType.CONTROL}
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="c.gguf")
    conv = [{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "Hi! naïve 😀 17+25?"}]
    ids = hf_tok.apply_chat_template(conv, add_generation_prompt=True)
    assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == render_prompt(conv, tokenizer)


@pytest.mark.parametrize("dtype, qtype", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_half_precision_matrices_keep_norms_and_biases_float32(tmp_path, dtype, qtype):
    model = random_model(**GPT2)
    save_model(model, tmp_path / "ckpt")
    name = str(dtype).removeprefix("torch.")
    argv = ["export", str(tmp_path / "ckpt"), str(tmp_path / "h.gguf"), "--format", "gguf", "--dtype", name]
    assert main(argv) == 0
    reader = gguf.GGUFReader(tmp_path / "h.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType[qtype]
    assert types["blk.0.attn_qkv.bias"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    with torch.no_grad():  # transformers reads the half-precision weights back: the model with its matrices rounded
        for p in model.parameters():
            p.copy_(p.to(dtype).float()) if p.dim() == 2 else None
    idx = random_ids(V, (1, 16))
    with torch.no_grad():
        expected = model(idx)[0]
        assert_close_f32(logits_of(tmp_path, "h.gguf", idx), expected)
        assert_not_close_f32(random_model(**GPT2)(idx)[0], expected)  # the float32 weights differ: the test bites


def test_trained_tokenizer_goes_in_with_its_own_ids(tmp_path):
    from gpt2lab.tokenizer.train import BpeConfig, documents, train_bpe

    train_bpe(documents(["shakespeare"], held_out=False), BpeConfig(512, "gpt4", max_chars=50_000), tmp_path / "tok")
    tok = TrainedTokenizer(tmp_path / "tok")
    model = random_model(**LLAMA | dict(vocab_size=tok.n_vocab, padded_vocab_size=None, n_head=2, n_embd=32))
    export_gguf(model, tmp_path / "t.gguf", trained_vocab(tok))
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tok.tok.id_to_token(i) for i in range(tok.n_vocab)]
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"  # llama.cpp's cl100k-style split (pattern gpt4)
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.eot != 50256
    merges = json.loads(tok.tok.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    idx = random_ids(tok.n_vocab, (1, 16))
    with torch.no_grad():
        assert_close_f32(logits_of(tmp_path, "t.gguf", idx), model(idx)[0])


@pytest.mark.parametrize(
    "switches, named",
    [
        (dict(mlp="relu2"), "model.mlp=relu2"),
        (dict(hf_llama.REQUIRED, n_experts=4, experts_per_token=2), "model.n_experts=4"),
        (dict(hf_llama.REQUIRED, logit_softcap=30.0), "model.logit_softcap=30.0"),
    ],
)
def test_other_families_are_a_clear_error_naming_the_switch(tmp_path, capsys, switches, named):
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=1, n_head=2, n_embd=32, **switches))
    save_model(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "x.gguf"), "--format", "gguf"]) != 0
    err = capsys.readouterr().err
    assert named in err and "llama.cpp" in err and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()  # refused before anything is written


def test_bad_outputs_and_options_are_clear_errors(tmp_path, capsys):
    model = random_model(**GPT2 | {"vocab_size": 1000, "padded_vocab_size": None})
    with pytest.raises(Gpt2LabError, match="vocab_size is 1,000, its tokenizer has 50,257"):
        export_gguf(model, tmp_path / "small.gguf", gpt2_vocab(get_tokenizer()))
    save_model(random_model(**GPT2), tmp_path / "ckpt")
    (tmp_path / "dir").mkdir()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "dir"), "--format", "gguf"]) != 0
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--dtype", "float16"]) != 0
    assert "--dtype applies to --format gguf" in capsys.readouterr().err
