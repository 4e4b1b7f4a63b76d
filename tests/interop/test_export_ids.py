"""Exported folders stop where they should, for every family: config.json's bos/eos, generation_config.json and
tokenizer.json name the tokenizer's <|endoftext|> (and a chat model's <|assistant_end|>), checked with transformers'
AutoModelForCausalLM.generate and AutoTokenizer, and tokenizer.json against tiktoken."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpt2lab.chat.base import CHAT_VOCAB_SIZE
from gpt2lab.chat.template import render_prompt
from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, save_model
from gpt2lab.cli.main import main
from gpt2lab.interop.hf import export_hf
from gpt2lab.interop.tokenizer_match import record_of
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import EOT_ID, SPECIAL_IDS, SPECIAL_TOKENS, TOKENIZER_JSON, TOKENIZER_META
from tests.chat.test_trained_tokenizer import tok  # noqa: F401 (fixture: a 512-token trained tokenizer)

transformers = pytest.importorskip("transformers")

ROPE = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=40, bias=False, rope_theta=500.0,
            layer_norm_epsilon=1e-6)  # fmt: skip
MOE = dict(n_experts=4, experts_per_token=2, moe_hidden=12, moe_bias_update_rate=0.0)
MLA = dict(attention="mla", kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8)
# family -> ([model] switches, the transformers class export writes)
FAMILIES = {
    "gpt2": ({}, "GPT2LMHeadModel"),
    "llama": ({**ROPE, "n_kv_head": 1, "tie_embeddings": False}, "LlamaForCausalLM"),
    "qwen3": ({**ROPE, "qk_norm": True}, "Qwen3ForCausalLM"),
    "qwen3_moe": ({**ROPE, **MOE, "qk_norm": True, "moe_layers": "1"}, "Qwen3MoeForCausalLM"),
    "mixtral": ({**ROPE, **MOE}, "MixtralForCausalLM"),
    "deepseek_v3": ({**ROPE, **MLA, "tie_embeddings": False}, "DeepseekV3ForCausalLM"),
}
TEXTS = ["Hello, world!", "naïve café — 日本語 😀\n\n  spaces  ", " 's 've 're\t\tx 123456", "a<|endoftext|>b"]


def _export(tmp_path, family: str, vocab_size: int = 50257, chat: bool = False, tok=None):  # noqa: F811
    """A tiny random model of this family saved as a checkpoint, exported by `gpt2lab export`; the folder."""
    torch.manual_seed(0)
    switches, _ = FAMILIES[family]
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, **switches)).eval()
    state = {"config": {"sft": {"data": "x.jsonl"}}} if chat else {}  # what `gpt2lab sft` records: a chat model
    state |= {"tokenizer": record_of(tok)} if tok is not None else {}
    save_model(model, tmp_path / "ckpt", extra={TRAIN_STATE_KEY: state})
    for name in (TOKENIZER_JSON, TOKENIZER_META) if tok is not None else ():  # a run keeps its tokenizer beside
        shutil.copyfile(tok.folder / name, tmp_path / "ckpt" / name)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    return tmp_path / "hf"


def _read(folder, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _generate_until(hf, prompt: list[int], stop: int, k: int = 3, max_new_tokens: int = 12) -> list[int]:
    """hf.generate's greedy new tokens, after scaling `stop`'s output-embedding row so that it wins greedily by
    step k at the latest (at step k its logit is over twice any other in size): the folder's stopping rule is all that
    ends generation before max_new_tokens."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        mask = torch.ones_like(ids)  # one unpadded row: the pad id is never used
        before = hf.generate(
            ids, attention_mask=mask, max_new_tokens=k, do_sample=False, eos_token_id=[], pad_token_id=0
        )
        assert stop not in before[0, len(prompt) :].tolist()  # the random model never chose it by itself
        h = hf.base_model(before).last_hidden_state[0, -1]  # the final norm's output predicting step k
        head = hf.get_output_embeddings().weight
        head[stop] = h * (2 * (head @ h).abs().max() + 1) / (h @ h)
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(prompt) :].tolist()
    assert len(new) < max_new_tokens, f"generate did not stop at {stop}: {new}"
    return new


@pytest.mark.parametrize("family", FAMILIES)
def test_a_base_export_stops_at_endoftext(family, tmp_path):
    folder = _export(tmp_path, family)
    config, generation = _read(folder, "config.json"), _read(folder, "generation_config.json")
    assert (config["bos_token_id"], config["eos_token_id"]) == (EOT_ID, EOT_ID)
    assert generation == {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}
    assert "pad_token_id" not in config  # else Llama-like models freeze <|endoftext|>'s embedding row (padding_idx)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == FAMILIES[family][1]
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == EOT_ID
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.is_fast and hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>"
    assert hf_tok.convert_tokens_to_ids(hf_tok.eos_token) == hf.config.eos_token_id
    new = _generate_until(hf, hf_tok("Once upon a time")["input_ids"], EOT_ID)
    assert new[-1] == EOT_ID and EOT_ID not in new[:-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_chat_export_stops_at_the_assistants_end(family, tmp_path, tokenizer):
    folder = _export(tmp_path, family, vocab_size=CHAT_VOCAB_SIZE, chat=True)
    end = SPECIAL_IDS["<|assistant_end|>"]
    assert _read(folder, "config.json")["eos_token_id"] == EOT_ID
    assert _read(folder, "generation_config.json") == {"bos_token_id": EOT_ID, "eos_token_id": [EOT_ID, end],
                                                       "pad_token_id": EOT_ID}  # fmt: skip
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.is_fast and hf_tok.eos_token == "<|endoftext|>"
    assert {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} == SPECIAL_IDS
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))  # the chat tokens are in tokenizer.json itself
    assert {t: fast.token_to_id(t) for t in SPECIAL_TOKENS} == SPECIAL_IDS
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf.generation_config.eos_token_id == [EOT_ID, end]
    prompt = render_prompt([{"role": "user", "content": "What is 17+25?"}], tokenizer)
    assert hf_tok.apply_chat_template([{"role": "user", "content": "What is 17+25?"}], add_generation_prompt=True,
                                      return_dict=False) == prompt  # fmt: skip
    new = _generate_until(hf, prompt, end)
    assert new[-1] == end and end not in new[:-1]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_llama_cpps_gguf_converter_reads_endoftext_as_bos_and_eos(family, tmp_path):
    """gguf-py's SpecialVocab (what llama.cpp's convert_hf_to_gguf.py writes into a GGUF file) finds <|endoftext|>
    and GPT-2's merges in the folder: the issue's GGUF had BOS = EOS = 11 (',')."""
    gguf = pytest.importorskip("gguf")
    folder = _export(tmp_path, family)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=50257)
    assert special.special_token_ids["bos"] == special.special_token_ids["eos"] == EOT_ID
    assert len(special.merges) == 50000


def test_tokenizer_json_encodes_like_tiktoken(tmp_path, tokenizer):
    """tokenizer.json on its own (Hugging Face tokenizers, as llama.cpp's converter and TGI read it) gives tiktoken's
    ids, <|endoftext|> included, and decodes them back."""
    from tokenizers import Tokenizer

    folder = _export(tmp_path, "llama")
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert fast.get_vocab_size() == 50257 and fast.token_to_id("<|endoftext|>") == EOT_ID
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert fast.encode(text).ids == ids, text
        assert hf_tok(text)["input_ids"] == ids, text
        assert fast.decode(ids, skip_special_tokens=False) == text


def test_an_export_with_a_trained_tokenizer_stops_at_its_endoftext(tmp_path, tok):  # noqa: F811
    folder = _export(tmp_path, "qwen3", vocab_size=tok.vocab_size, tok=tok)
    assert _read(folder, "config.json")["eos_token_id"] == tok.eot != EOT_ID
    assert _read(folder, "generation_config.json")["eos_token_id"] == tok.eot
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.convert_tokens_to_ids(hf_tok.eos_token) == tok.eot
    new = _generate_until(hf, tok.encode("KING RICHARD"), tok.eot)
    assert new[-1] == tok.eot


def test_a_vocabulary_without_endoftext_writes_null_ids_not_the_familys_defaults(tmp_path):
    """A 97-token model has no id 50256: null bos/eos (LlamaConfig's defaults, 1 and 2, are no end of text here)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=2, n_embd=16, **FAMILIES["llama"][0]))
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.bos_token_id is None and hf.config.eos_token_id is None
    assert not (tmp_path / "hf" / "generation_config.json").exists()
    export_hf(model, tmp_path / "hf90", eot=90)  # a tokenizer whose <|endoftext|> is 90
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf90").generation_config.eos_token_id == 90
