"""Hugging Face GPT-2 weights in and out (Llama and Qwen3 through ``gpt2lab.interop.llama``).

Hugging Face stores GPT-2's projections as ``Conv1D`` (weight shape (in, out)); gpt2lab uses
``nn.Linear`` (out, in), so those four weights are transposed on the way in and out. Export
drops the padded vocabulary rows and the tied ``lm_head.weight`` (transformers re-ties it), and writes
the tokenizer's <|endoftext|> id as bos/eos (config.json, generation_config.json) for every family, beside
tokenizer.json. ``transformers`` itself is never imported here (``tokenizers`` builds tokenizer.json);
``huggingface_hub`` only for hub downloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from gpt2lab.checkpoint.folder import check_and_load, empty_model, load_state_dict, read_json, save_tensors
from gpt2lab.data.shards import write_json
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop import deepseek as hf_deepseek
from gpt2lab.interop import llama as hf_llama
from gpt2lab.interop import moe as hf_moe
from gpt2lab.model.config import PRESETS, GPTConfig
from gpt2lab.model.gpt import GPT

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older HF files
HUB_NAMES = tuple(PRESETS)  # gpt2, gpt2-medium, gpt2-large, gpt2-xl
HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"]
# OpenAI's file names -> Hugging Face's, for the same two tokenizer files
TOKENIZER_FILE_NAMES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}


def config_from_hf(hf: dict, source: Path | str = "config.json") -> GPTConfig:
    """A GPTConfig from a Hugging Face GPT-2 (or Llama, Qwen3) config.json dict; unsupported options are an error."""
    if hf.get("model_type") in hf_llama.FAMILIES:
        return hf_llama.config_from_hf(hf, source)
    if hf.get("model_type") == hf_deepseek.MODEL_TYPE:
        return hf_deepseek.config_from_hf(hf, source)
    if hf.get("model_type") in hf_moe.FAMILIES:
        return hf_moe.config_from_hf(hf, source)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise Gpt2LabError(
            f"{source}: model_type is {hf.get('model_type')!r}; gpt2lab loads gpt2, {', '.join(hf_llama.FAMILIES)}, "
            f"{hf_deepseek.MODEL_TYPE}, {', '.join(hf_moe.FAMILIES)}"
        )
    unsupported = {
        "activation_function": ("gelu_new", None),
        "scale_attn_by_inverse_layer_idx": (False, None),
        "reorder_and_upcast_attn": (False, None),
        "add_cross_attention": (False, None),
        "scale_attn_weights": (True, None),
    }
    for key, allowed in unsupported.items():
        if hf.get(key) not in allowed:
            raise Gpt2LabError(f"{source}: {key}={hf[key]!r} is not supported (GPT-2 uses {allowed[0]!r})")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        raise Gpt2LabError(f"{source}: n_inner={n_inner} is not supported (GPT-2 uses 4 * n_embd)")
    try:
        return GPTConfig(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        )
    except KeyError as e:
        raise Gpt2LabError(f"{source}: missing key {e}") from None


def config_to_hf(config: GPTConfig) -> dict:
    """A Hugging Face GPT-2 config.json dict for this config (vocabulary unpadded)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
    }  # bos_token_id, eos_token_id: export_hf's, the tokenizer's <|endoftext|>


def from_hf_state_dict(
    state: dict[str, torch.Tensor], config: GPTConfig, source: Path | str, rope_interleave: bool = True
) -> GPT:
    """A GPT holding Hugging Face GPT-2 weights (Conv1D layout, with or without 'transformer.'), or Llama/Qwen3's.

    DeepSeek-V3's too, for an MLA config: rope_interleave is its config.json's (True: DeepSeek's RoPE layout).
    """
    if config.attention == "mla":
        model = empty_model(config)
        check_and_load(model, hf_deepseek.from_hf_state_dict(state, config, rope_interleave), source)
        return model
    if hf_llama.family(config) or hf_moe.family(config):
        model = empty_model(config)
        convert = hf_moe.from_hf_state_dict if config.n_experts else hf_llama.from_hf_state_dict
        check_and_load(model, convert(state, config), source)
        return model
    converted = {}
    for key, tensor in state.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # the original OpenAI-converted files omit the prefix
        converted[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    wte = converted.get("transformer.wte.weight")
    if wte is not None and config.padded_vocab_size and wte.size(0) == config.vocab_size:
        pad = wte.new_zeros(config.padded_vocab_size - config.vocab_size, wte.size(1))
        converted["transformer.wte.weight"] = torch.cat([wte, pad])
    model = empty_model(config)
    check_and_load(model, converted, source)
    return model


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights in Hugging Face GPT-2 layout: Conv1D transposed, no padding, no lm_head."""
    V = model.config.vocab_size
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensor = tensor.detach().to("cpu")
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        elif key == "transformer.wte.weight":
            tensor = tensor[:V]
        out[key] = tensor.contiguous()
    return out


def load_hf_folder(folder: str | Path) -> GPT:
    """A GPT from a local Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin)."""
    folder = Path(folder)
    hf_config = read_json(folder / "config.json")
    config = config_from_hf(hf_config, folder / "config.json")
    if (folder / "model.safetensors").is_file():
        source = folder / "model.safetensors"
        state = load_state_dict(source)
    elif (folder / "pytorch_model.bin").is_file():
        source = folder / "pytorch_model.bin"
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)  # never unpickle objects
        except Exception as e:
            raise Gpt2LabError(f"{source}: could not be read as plain tensors: {e}") from None
    else:
        raise Gpt2LabError(f"{folder}: no model.safetensors or pytorch_model.bin")
    if config.vocab_size != 50257 and (hf_llama.family(config) or hf_moe.family(config) or config.attention == "mla"):
        print(
            f"note: {folder} has a {config.vocab_size:,}-token vocabulary, not GPT-2's: gpt2lab's tokenizer "
            "(sample, eval) does not match it; the model itself works from Python with token ids",
            file=sys.stderr,
        )
    return from_hf_state_dict(state, config, source, hf_config.get("rope_interleave", True))


def download(repo_id: str) -> Path:
    """Fetch a GPT-2 repository from the Hugging Face hub (or its local cache); return the folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise Gpt2LabError(
            f"loading {repo_id!r} from the hub needs huggingface_hub: pip install 'gpt2lab[hf]'"
        ) from None
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        raise Gpt2LabError(
            f"could not fetch {repo_id!r} from the Hugging Face hub or its cache (offline?): "
            f"{type(e).__name__}. Pass a local Hugging Face folder or a gpt2lab checkpoint instead."
        ) from None


# the [model] switches beyond GPT-2, whose defaults are GPT-2's: a model that changes any has no GPT2LMHeadModel form
_BEYOND_GPT2 = (
    "norm qk_norm pos_embedding mlp mlp_hidden n_kv_head bias tie_embeddings logit_softcap x0_skip value_embeddings"
).split()
GPT2_SWITCHES = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name in _BEYOND_GPT2}


def check_gpt2(config: GPTConfig) -> None:
    """One error naming the switches that take a model outside Hugging Face's GPT-2 (before anything is written)."""
    changed = [f"model.{k}={getattr(config, k)}" for k, v in GPT2_SWITCHES.items() if getattr(config, k) != v]
    if config.mlp_hidden == 4 * config.n_embd:  # the GPT-2 width, written out
        changed.remove(f"model.mlp_hidden={config.mlp_hidden}")
    if changed:
        llama = ", ".join(f"model.{k}={v}" for k, v in hf_llama.REQUIRED.items())
        raise Gpt2LabError(
            f"export: {', '.join(changed)} has no Hugging Face equivalent: GPT-2 takes the defaults, Llama takes "
            f"{llama} (+ model.qk_norm=true: Qwen3); the checkpoint itself samples, evaluates and trains"
        )


def export_hf(
    model: GPT, out_dir: str | Path, tokenizer_files: tuple[Path, Path] | None = None, eot: int | None = 50256
) -> Path:
    """Write a Hugging Face folder (GPT-2, Llama, Qwen3, Qwen3-MoE, Mixtral or DeepSeek-V3): config.json,
    generation_config.json, model.safetensors and, given GPT-2's two files, the tokenizer.

    eot: the tokenizer's <|endoftext|> id (GPT-2's 50256 by default), written as bos/eos so that ``generate`` stops
    there; None, or an id outside the vocabulary, writes null (not the family's defaults, e.g. Llama's 1 and 2).
    """
    if model.config.attention == "mla":  # DeepSeek-V3 (gpt2lab.interop.deepseek)
        hf_deepseek.check_exportable(model.config)
        to_config, to_weights = hf_deepseek.config_to_hf, hf_deepseek.to_hf_state_dict
    elif model.config.n_experts:  # Qwen3-MoE or Mixtral (gpt2lab.interop.moe)
        hf_moe.check_exportable(model)
        to_config, to_weights = hf_moe.config_to_hf, hf_moe.to_hf_state_dict
    elif hf_llama.family(model.config):
        to_config, to_weights = hf_llama.config_to_hf, hf_llama.to_hf_state_dict
    else:
        check_gpt2(model.config)
        to_config, to_weights = config_to_hf, to_hf_state_dict
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = eot if eot is not None and eot < model.config.vocab_size else None
    config = to_config(model.config) | {"bos_token_id": eot, "eos_token_id": eot}
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    weights = to_weights(model)
    save_tensors(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(out_dir / "config.json", config)
    if eot is not None:  # generate's stopping rule (a chat export lists <|assistant_end|> too: gpt2lab.chat.export)
        write_json(out_dir / "generation_config.json", generation_config(eot, [eot]))
    if tokenizer_files is not None:
        encoder, vocab = tokenizer_files
        shutil.copyfile(encoder, out_dir / "vocab.json")
        shutil.copyfile(vocab, out_dir / "merges.txt")
        (out_dir / "tokenizer.json").write_text(gpt2_tokenizer_json(encoder, vocab))
        tok_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.block_size}
        tok_config |= {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        write_json(out_dir / "tokenizer_config.json", tok_config)
    return out_dir


def generation_config(eot: int, eos: list[int]) -> dict:
    """generation_config.json: stop at any of ``eos``, pad with <|endoftext|>.

    The pad id lives here, not in config.json: there transformers' Llama-like models make it the embedding's
    padding_idx, whose row then gets no gradient in fine-tuning, and <|endoftext|> is a token the model must learn.
    """
    return {"bos_token_id": eot, "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": eot}


def gpt2_tokenizer_json(encoder: str | Path, vocab: str | Path) -> str:
    """tokenizer.json (Hugging Face tokenizers' whole-tokenizer file) of OpenAI's two GPT-2 files: byte-level BPE,
    GPT-2's pre-tokenisation regex, <|endoftext|> special: what transformers' GPT-2 converter builds (transformers 5's
    GPT2TokenizerFast(vocab_file=..., merges_file=...) no longer reads the files: it saves an empty vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    ranks = json.loads(Path(encoder).read_text(encoding="utf-8"))
    lines = Path(vocab).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tok = Tokenizer(BPE(ranks, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return tok.to_str(pretty=True)


def export_trained_tokenizer(tok, out_dir: Path, block_size: int) -> None:
    """A trained tokenizer (tokenizer/train.py) beside the weights: tokenizer.json as trained, for AutoTokenizer
    (its <|endoftext|> id, tok.eot, goes to export_hf)."""
    from gpt2lab.tokenizer.bpe import EOT_TOKEN, TOKENIZER_JSON, TOKENIZER_META

    for name in (TOKENIZER_JSON, TOKENIZER_META):
        if (tok.folder / name).is_file():
            shutil.copyfile(tok.folder / name, out_dir / name)
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}
    tok_config |= {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN}
    write_json(out_dir / "tokenizer_config.json", tok_config)


def export_command(args: argparse.Namespace, model: GPT, tokenizer=None) -> int:
    """`gpt2lab export CHECKPOINT OUT_DIR`, given the loaded model (the CLI loads it: hf.py never imports loading)
    and its tokenizer where it is not GPT-2's (None: GPT-2's files are looked up here)."""
    from gpt2lab.tokenizer.bpe import TrainedTokenizer, get_tokenizer

    if isinstance(tokenizer, TrainedTokenizer):
        out = export_hf(model, args.out_dir, None, eot=tokenizer.eot)
        export_trained_tokenizer(tokenizer, out, model.config.block_size)
        print(f"wrote Hugging Face folder {out} ({model.num_params(False):,} parameters, tokenizer {tokenizer.name})")
        return 0
    try:
        files = (tokenizer or get_tokenizer(args.tokenizer)).files
    except Gpt2LabError as e:
        if args.tokenizer:
            raise
        print(f"warning: tokenizer files not exported ({e})", file=sys.stderr)
        files = None
    out = export_hf(model, args.out_dir, files)
    note = "with tokenizer files" if files else "without tokenizer files"
    kind = hf_llama.FAMILIES.get(hf_llama.family(model.config), "GPT2LMHeadModel")
    kind = hf_moe.FAMILIES.get(hf_moe.family(model.config), kind)
    kind = hf_deepseek.CLASS if model.config.attention == "mla" else kind
    print(f"wrote Hugging Face {kind} folder {out} ({model.num_params(False):,} parameters, {note})")
    return 0
