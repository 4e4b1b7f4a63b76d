"""A checkpoint as one GGUF file, the format llama.cpp and Ollama run (``gpt2lab export CKPT OUT.gguf --format gguf``).

The families are llama.cpp's own architectures, with the tensor names and metadata keys of the ``gguf``
package (``gguf.TENSOR_NAMES``, ``gguf.Keys``), as llama.cpp's convert_hf_to_gguf.py writes them:
- ``gpt2`` for GPT-2 (the [model] defaults): token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output,
  ffn_norm, ffn_up, ffn_down}, output_norm. gpt2lab's ``nn.Linear`` weights (out, in) are already the layout
  convert_hf_to_gguf.py makes of Hugging Face's Conv1D (it transposes them): no transpose here.
- ``llama`` (RoPE, RMSNorm, SwiGLU, no bias) and ``qwen3`` (the same + qk_norm), as in ``gpt2lab.interop.llama``:
  the fused c_attn is split into attn_q, attn_k, attn_v. llama.cpp's llama rotates adjacent pairs (GPT-J style)
  where gpt2lab rotates (x_i, x_{i + hs/2}) as Hugging Face does, so q and k rows are permuted exactly as
  convert_hf_to_gguf.py's LlamaModel.permute does; qwen3 rotates halves in llama.cpp too (no permutation).
A tied LM head writes no ``output`` tensor (llama.cpp and transformers then use token_embd); padded vocabulary
rows are dropped. Arrays go to ``GGUFWriter.add_tensor`` in PyTorch's layout; GGUF stores their dims reversed.

The tokenizer goes in as llama.cpp's byte-level BPE (``tokenizer.ggml.model = "gpt2"``): tokens in id order,
merges, <|endoftext|> as bos and eos (never added in front: GPT-2 does not), and for a chat model
<|assistant_end|> as eot and the chat template, the one the Hugging Face chat export writes (given by the
caller: the chat layer sits above this one). ``gguf`` is imported lazily (``pip install 'gpt2lab[hf]'``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop import llama as hf_llama
from gpt2lab.interop.hf import GPT2_SWITCHES
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import EOT_ID, SPECIAL_IDS, SPECIAL_TOKENS, TOKENIZER_META

# --dtype of the matrices -> (GGML tensor type, general.file_type); norms and biases stay float32 (llama.cpp)
GGUF_DTYPES = {"float32": ("F32", "ALL_F32"), "float16": ("F16", "MOSTLY_F16"), "bfloat16": ("BF16", "MOSTLY_BF16")}
# gpt2lab's pre-tokenisation patterns (gpt2lab.tokenizer.train.PATTERNS) -> llama.cpp's name for the same split
PRE_TOKENIZERS = {"gpt2": "gpt-2", "gpt4": "llama-bpe"}  # llama-bpe: Llama 3's, cl100k's regex
# per block: gpt2lab's module -> llama.cpp's tensor (gguf.MODEL_TENSOR's name); c_attn is split for llama/qwen3
GPT2_LAYER = {"ln_1": "ATTN_NORM", "attn.c_attn": "ATTN_QKV", "attn.c_proj": "ATTN_OUT", "ln_2": "FFN_NORM",
              "mlp.c_fc": "FFN_UP", "mlp.c_proj": "FFN_DOWN"}  # fmt: skip
LLAMA_LAYER = {"ln_1": "ATTN_NORM", "attn.c_proj": "ATTN_OUT", "attn.q_norm": "ATTN_Q_NORM",
               "attn.k_norm": "ATTN_K_NORM", "ln_2": "FFN_NORM", "mlp.c_gate": "FFN_GATE", "mlp.c_fc": "FFN_UP",
               "mlp.c_proj": "FFN_DOWN"}  # fmt: skip
TOP = {"transformer.wte": "TOKEN_EMBD", "transformer.wpe": "POS_EMBD", "transformer.ln_f": "OUTPUT_NORM",
       "lm_head": "OUTPUT"}  # fmt: skip


def _gguf():
    try:
        import gguf
    except ImportError:
        raise Gpt2LabError("export --format gguf needs the gguf package: pip install 'gpt2lab[hf]'") from None
    return gguf


def gguf_arch(config: GPTConfig) -> str:
    """llama.cpp's architecture for this network (gpt2, llama or qwen3); any other is an error naming the switches."""
    name = hf_llama.family(config)
    if name is not None:
        return name
    # the GPT-2 switches; the head may be untied (llama.cpp and transformers read an `output` tensor)
    gpt2 = {k: v for k, v in GPT2_SWITCHES.items() if k != "tie_embeddings"} | {"attention": "mha", "n_experts": 0}
    if config.mlp_hidden == 4 * config.n_embd:
        gpt2.pop("mlp_hidden")
    if all(getattr(config, k) == v for k, v in gpt2.items()):
        return "gpt2"
    target = gpt2 if config.pos_embedding == "learned" else hf_llama.REQUIRED | {"attention": "mha", "n_experts": 0}
    changed = ", ".join(f"model.{k}={getattr(config, k)}" for k, v in target.items() if getattr(config, k) != v)
    llama = ", ".join(f"model.{k}={v}" for k, v in hf_llama.REQUIRED.items())
    raise Gpt2LabError(
        f"export --format gguf: {changed} is not an architecture gpt2lab writes for llama.cpp: gpt2 takes the "
        f"[model] defaults, llama takes {llama} (+ model.qk_norm=true: qwen3), both with model.attention=mha and "
        "model.n_experts=0; `gpt2lab export` without --format gguf writes this model for transformers"
    )


@dataclass
class Vocab:
    """A byte-level BPE tokenizer as GGUF holds it: token strings by id, their types, merges, llama.cpp's pre."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    eot: int  # <|endoftext|>: bos and eos
    assistant_end: int | None  # a chat model's end of turn (eot in llama.cpp's terms)
    n_text: int  # the ids text encodes to: the model must have a row for each


def gpt2_vocab(tok) -> Vocab:
    """GPT-2's tokenizer from OpenAI's two files (encoder.json, vocab.bpe), with the chat tokens at SPECIAL_IDS."""
    gguf = _gguf()
    if tok.files is None:
        raise Gpt2LabError(
            "export --format gguf needs GPT-2's encoder.json and vocab.bpe: pass --tokenizer FOLDER holding them"
        )
    encoder, bpe = tok.files
    ids = json.loads(Path(encoder).read_text(encoding="utf-8"))
    tokens = sorted(ids, key=ids.get) + list(SPECIAL_TOKENS)  # the chat tokens follow (SPECIAL_IDS)
    lines = Path(bpe).read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    control = {EOT_ID, *SPECIAL_IDS.values()}
    types = [gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL for i in range(len(tokens))]
    return Vocab(tokens, types, merges, "gpt-2", EOT_ID, SPECIAL_IDS["<|assistant_end|>"], len(ids))


def trained_vocab(tok) -> Vocab:
    """A trained tokenizer (``gpt2lab tokenizer train``) from its tokenizer.json: vocabulary, merges, added tokens."""
    gguf = _gguf()
    data = json.loads(tok.tok.to_str())
    by_id = {i: t for t, i in tok.tok.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    meta_path = tok.folder / TOKENIZER_META
    pattern = (json.loads(meta_path.read_text()).get("config") or {}).get("pattern") if meta_path.is_file() else None
    if pattern not in PRE_TOKENIZERS:
        raise Gpt2LabError(
            f"{meta_path}: pre-tokenisation pattern {pattern!r} has no llama.cpp equivalent "
            f"(gpt2lab writes {', '.join(PRE_TOKENIZERS)})"
        )
    end = tok.tok.token_to_id("<|assistant_end|>")
    return Vocab(tokens, types, merges, PRE_TOKENIZERS[pattern], tok.eot, end, len(tokens))


def fit_vocab(vocab: Vocab, n_vocab: int) -> Vocab:
    """The vocabulary cut or padded to the model's rows (llama.cpp requires as many tokens as token_embd rows)."""
    gguf = _gguf()
    if n_vocab < vocab.n_text:
        raise Gpt2LabError(
            f"the model's vocab_size is {n_vocab:,}, its tokenizer has {vocab.n_text:,} tokens: pass the model's "
            "own --tokenizer"
        )
    pad = [f"[PAD{i}]" for i in range(len(vocab.tokens), n_vocab)]  # rows no token reaches (as convert_hf_to_gguf)
    tokens = (vocab.tokens + pad)[:n_vocab]
    types = (vocab.types + [gguf.TokenType.UNUSED] * len(pad))[:n_vocab]
    end = vocab.assistant_end if vocab.assistant_end is not None and vocab.assistant_end < n_vocab else None
    return Vocab(tokens, types, vocab.merges, vocab.pre, vocab.eot, end, vocab.n_text)


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q or k rows from the half-split RoPE layout to llama.cpp's adjacent pairs (convert_hf_to_gguf.py's permute)."""
    return w.reshape(n_head, 2, w.size(0) // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, vocabulary unpadded, no tied head; float32 on the CPU."""
    gguf = _gguf()
    cfg, V = model.config, model.config.vocab_size
    layer = GPT2_LAYER if arch == "gpt2" else LLAMA_LAYER
    out = {}
    for key, w in model.state_dict().items():
        module, kind = key.rsplit(".", 1)  # kind: weight or bias
        w = w.detach().to("cpu", torch.float32)
        if module == "lm_head" and cfg.tie_embeddings:
            continue  # the same tensor as token_embd: llama.cpp and transformers re-tie it
        if module in TOP:
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[TOP[module]]]
            out[f"{name}.{kind}"] = w[:V] if module in ("transformer.wte", "lm_head") else w
            continue
        _, _, i, part = module.split(".", 3)  # transformer.h.{i}.{part}
        if arch != "gpt2" and part == "attn.c_attn":
            kv = cfg.kv_heads * cfg.head_size
            q, k, v = w.split([cfg.n_embd, kv, kv])
            if arch == "llama":
                q, k = permute_rope(q, cfg.n_head), permute_rope(k, cfg.kv_heads)
            for which, t in zip(("ATTN_Q", "ATTN_K", "ATTN_V"), (q, k, v), strict=True):
                out[f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[which]].format(bid=i)}.{kind}"] = t
            continue
        if part not in layer:
            raise Gpt2LabError(f"export --format gguf: no llama.cpp {arch} tensor for {key}")
        out[f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[layer[part]]].format(bid=i)}.{kind}"] = w
    return out


def add_hparams(writer, config: GPTConfig, arch: str) -> None:
    """The architecture's hyperparameters under gguf.Keys (context, widths, heads, norm epsilon, RoPE)."""
    gguf = _gguf()
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.hidden)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_head_count_kv(config.kv_heads)
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_key_length(config.head_size)  # as convert_hf_to_gguf.py writes a config's head_dim
    writer.add_value_length(config.head_size)
    writer.add_vocab_size(config.vocab_size)
    if config.rope_scaling != "none":  # llama.cpp's keys, as convert_hf_to_gguf.py writes a rope_scaling
        writer.add_rope_scaling_type(gguf.RopeScalingType(config.rope_scaling))
        writer.add_rope_scaling_factor(config.rope_factor)
    if config.rope_scaling == "yarn":
        writer.add_rope_scaling_orig_ctx_len(config.rope_original_context or config.block_size)


def add_vocab(writer, vocab: Vocab, chat_template: str | None) -> None:
    """The tokenizer under tokenizer.ggml.*: llama.cpp's byte-level BPE, special ids, the chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.eot)
    writer.add_eos_token_id(vocab.eot)
    writer.add_add_bos_token(False)  # as GPT-2; the chat template writes its own <|endoftext|> first
    if chat_template is not None:
        if vocab.assistant_end is None:
            raise Gpt2LabError("a chat model's tokenizer must hold <|assistant_end|> (its end of turn)")
        writer.add_eot_token_id(vocab.assistant_end)
        writer.add_chat_template(chat_template)


def export_gguf(
    model: GPT, path: str | Path, vocab: Vocab, chat_template: str | None = None, dtype: str = "float32",
    name: str | None = None,
) -> Path:  # fmt: skip
    """Write the model, its tokenizer (``vocab``) and, for a chat model, its chat template as one GGUF file.

    dtype: float32, float16 or bfloat16 for the matrices (norms and biases stay float32, as llama.cpp keeps them).
    """
    gguf = _gguf()
    arch = gguf_arch(model.config)  # errors before anything is written
    vocab = fit_vocab(vocab, model.config.vocab_size)
    path = Path(path)
    if path.is_dir():
        raise Gpt2LabError(f"{path} is a folder: --format gguf writes one file, e.g. {path / 'model.gguf'}")
    if dtype not in GGUF_DTYPES:
        raise Gpt2LabError(f"export --format gguf: dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    qtype, ftype = GGUF_DTYPES[dtype]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name or path.stem)
    writer.add_file_type(gguf.LlamaFileType[ftype])
    add_hparams(writer, model.config, arch)
    add_vocab(writer, vocab, chat_template)
    for tensor_name, w in gguf_tensors(model, arch).items():
        t = gguf.GGMLQuantizationType.F32 if w.dim() == 1 else gguf.GGMLQuantizationType[qtype]
        data = gguf.quants.quantize(np.ascontiguousarray(w.numpy()), t)
        writer.add_tensor(tensor_name, data, raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_command(args: argparse.Namespace, model: GPT, tokenizer=None, chat_template: str | None = None) -> int:
    """`gpt2lab export CHECKPOINT OUT.gguf --format gguf`, given the loaded model, its tokenizer (None: GPT-2's)
    and, for a chat model, its chat template (the CLI decides: the chat layer sits above this one)."""
    from gpt2lab.tokenizer.bpe import TrainedTokenizer, get_tokenizer

    tok = tokenizer or get_tokenizer(args.tokenizer)
    trained = isinstance(tok, TrainedTokenizer)
    vocab = trained_vocab(tok) if trained else gpt2_vocab(tok)
    dtype = args.dtype or "float32"
    out = export_gguf(model, args.out_dir, vocab, chat_template, dtype, Path(args.checkpoint).resolve().name)
    chat = ", chat template and <|assistant_end|> as eot" if chat_template else ""
    print(
        f"wrote GGUF {gguf_arch(model.config)} file {out} ({model.num_params(False):,} parameters, {dtype}, "
        f"tokenizer {getattr(tok, 'name', 'gpt2')}{chat})"
    )
    return 0
