"""Hugging Face GPT-2 weights in and out, checked against transformers itself."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gpt2lab.checkpoint.folder import save_model
from gpt2lab.cli.main import main
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop.hf import config_from_hf
from gpt2lab.interop.load import load_model
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from tests.conftest import assert_close_f32, assert_not_close_f32

transformers = pytest.importorskip("transformers")

# (n_layer, n_head, n_embd, n_positions, vocab_size, layer_norm_epsilon): several shapes, not one
HF_CONFIGS = [
    (2, 2, 32, 64, 50257, 1e-5),
    (3, 4, 48, 32, 1000, 1e-5),
    (1, 1, 16, 16, 500, 1e-6),
]


def random_hf_model(n_layer, n_head, n_embd, n_positions, vocab_size, eps, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        vocab_size=vocab_size,
        layer_norm_epsilon=eps,
        initializer_range=0.2,  # larger than GPT-2's 0.02, so logits spread and differences show
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, which a fresh init leaves at 1 and 0
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_ids(vocab_size: int, shape: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", HF_CONFIGS)
def test_hf_folder_loads_with_the_same_logits_and_loss(tmp_path, shape):
    hf = random_hf_model(*shape)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = load_model(str(tmp_path))
    idx = random_ids(shape[4], (2, shape[3]))
    with torch.no_grad():
        expected = hf(idx, labels=idx)
        logits, loss = model(idx[:, :-1], idx[:, 1:])  # HF shifts labels inside; gpt2lab takes targets
        full, _ = model(idx)
    assert_close_f32(full, expected.logits)
    assert_close_f32(loss, expected.loss)
    for module in model.modules():  # the check bites: a LayerNorm epsilon off by 10x (a loader that dropped it)
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 10 * shape[5]
    with torch.no_grad():
        assert_not_close_f32(model(idx)[0], expected.logits)


@pytest.mark.parametrize("padded", [None, 1024])
@pytest.mark.parametrize("shape", [(2, 2, 32, 32, 1000), (3, 3, 24, 16, 1000)])
def test_export_through_the_cli_loads_in_transformers_with_the_same_logits(tmp_path, shape, padded):
    n_layer, n_head, n_embd, block_size, vocab_size = shape
    torch.manual_seed(0)
    cfg = GPTConfig(block_size, vocab_size, padded, n_layer, n_head, n_embd)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "ln_" in name or name.endswith("bias") else p.mul_(10)
    save_model(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.transformer.wte.weight.shape == (vocab_size, n_embd)  # padding dropped
    idx = random_ids(vocab_size, (2, block_size))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model(idx)
    assert_close_f32(logits, expected)


def test_official_key_style_with_attention_buffers_loads(tmp_path):
    """OpenAI-converted files: no 'transformer.' prefix, causal-mask buffers h.N.attn.bias/masked_bias."""
    shape = HF_CONFIGS[1]
    hf = random_hf_model(*shape, seed=3)
    n_positions = shape[3]
    state = {}
    for key, tensor in hf.state_dict().items():
        if key == "lm_head.weight":
            continue
        state[key.removeprefix("transformer.")] = tensor.contiguous()
    for i in range(shape[0]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, -1)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(tmp_path / "model.safetensors"))
    hf.config.to_json_file(tmp_path / "config.json")
    model = load_model(str(tmp_path))
    idx = random_ids(shape[4], (1, n_positions), seed=4)
    with torch.no_grad():
        assert_close_f32(model(idx)[0], hf(idx).logits)


def test_pytorch_model_bin_loads_without_unpickling_objects(tmp_path):
    hf = random_hf_model(*HF_CONFIGS[2], seed=5)
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    model = load_model(str(tmp_path))
    idx = random_ids(HF_CONFIGS[2][4], (1, 8))
    with torch.no_grad():
        assert_close_f32(model(idx)[0], hf(idx).logits)


def test_exported_tokenizer_files_encode_like_tiktoken(tmp_path, tokenizer):
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8)), tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "hf")
    text = "Hello, world! Ünïcödé 😀   spaces\n\nnew lines<|endoftext|>after"
    assert hf_tok.encode(text) == tokenizer.encode(text)
    assert hf_tok.decode(tokenizer.encode(text)) == text


def test_unsupported_hf_configs_are_clear_errors():
    base = {"model_type": "gpt2", "n_positions": 16, "vocab_size": 10, "n_layer": 1, "n_head": 1, "n_embd": 8}
    assert config_from_hf(base).block_size == 16
    for bad, match in [
        ({"model_type": "mistral"}, "gpt2lab loads gpt2, llama, qwen3"),
        ({"model_type": "llama"}, "missing key 'num_attention_heads'"),  # a Llama config is read as one
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_inner": 7}, "n_inner"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ]:
        with pytest.raises(Gpt2LabError, match=match):
            config_from_hf(base | bad, "x/config.json")
    missing = dict(base)
    del missing["n_embd"]
    with pytest.raises(Gpt2LabError, match="missing key 'n_embd'"):
        config_from_hf(missing, "x/config.json")


def test_hf_folder_with_mismatched_shapes_is_a_clear_cli_error(tmp_path, capsys):
    hf = random_hf_model(*HF_CONFIGS[2])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 32  # the weights are 16 wide
    config["n_head"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # drop transformers' own progress output
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and "shape" in err
    assert "Traceback" not in err
