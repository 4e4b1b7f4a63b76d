"""The model an SFT run starts from, given the chat vocabulary; and whether a model is a chat model.

GPT-2's embedding has 50,304 rows when padded (gpt2lab's runs) and 50,257 when loaded from Hugging Face; the
chat's special tokens take ids 50,257 onwards (``gpt2lab.tokenizer.bpe.SPECIAL_TOKENS``). A chat model's
``vocab_size`` counts them, so the loss trains them and sampling can draw <|assistant_end|>; where the base
has no spare rows, its embedding grows to the next multiple of 64. Rows that were never a token (padding, or
new) start as the mean of the real tokens' embeddings, so a special token's first logits are ordinary ones
(the usual init for added tokens, e.g. Hewitt 2021 "Initializing new word embeddings"). A trained tokenizer
(``gpt2lab tokenizer train``) holds the chat tokens already, after <|endoftext|>: no rows are added, and
their rows, which pretraining text never held, start at the mean the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gpt2lab.checkpoint.folder import CONFIG_NAME, TRAIN_STATE_KEY, read_json, read_model_config
from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import SPECIAL_TOKENS, VOCAB_SIZE

CHAT_VOCAB_SIZE = VOCAB_SIZE + len(SPECIAL_TOKENS)


def chat_model_config(config: GPTConfig, n_vocab: int = CHAT_VOCAB_SIZE) -> GPTConfig:
    """The base model's config with the special tokens in its vocabulary (rows added only where none are free).

    ``n_vocab``: the tokenizer's ids with the special tokens (a trained tokenizer's vocabulary holds them already).
    """
    vocab = max(config.vocab_size, n_vocab)
    rows = config.embedding_rows if config.embedding_rows >= vocab else -(-vocab // 64) * 64
    return dataclasses.replace(config, vocab_size=vocab, padded_vocab_size=rows if rows > vocab else None)


def base_tokenizer(spec: str):
    """The tokenizer of the model an SFT run fine-tunes (None: GPT-2's); it must hold the chat's role tokens."""
    from gpt2lab.interop.tokenizer_match import model_tokenizer

    tok = model_tokenizer(spec, load_gpt2=False)
    if tok is not None:  # a clear error for a tokenizer without them
        for role in ("system", "user", "assistant"):
            tok.special_id(f"<|{role}_start|>"), tok.special_id(f"<|{role}_end|>")
    return tok


def sft_vocab(tok) -> int:
    """The vocabulary of an SFT model with this tokenizer (None: GPT-2's, with the special tokens after it)."""
    return CHAT_VOCAB_SIZE if tok is None else tok.n_vocab


def base_model_config(spec: str) -> GPTConfig:
    """The GPTConfig of a --model spec (run, checkpoint, Hugging Face folder or name), weights not read."""
    from gpt2lab.interop.hf import config_from_hf
    from gpt2lab.interop.load import resolve

    kind, folder = resolve(spec)
    if kind == "checkpoint":
        return read_model_config(folder)
    return config_from_hf(read_json(folder / "config.json"), folder / "config.json")


def _fresh_rows(spec: str, tok, V: int, rows: int) -> list[int]:
    """Rows of the SFT model the base never trained: past its vocabulary, and a trained tokenizer's chat tokens
    (none where the base is a chat model already)."""
    if is_chat_model(spec) or (tok is None and V >= CHAT_VOCAB_SIZE):
        return []
    chat = [tok.special_id(t) for t in SPECIAL_TOKENS] if tok is not None else []
    return chat + list(range(V, rows))


@torch.no_grad()
def load_base_weights(model: GPT, spec: str) -> None:
    """Copy the base model's weights into ``model`` (its chat config); rows it lacks or never trained: the mean."""
    from gpt2lab.interop.load import load_model

    base = load_model(spec)
    V = base.config.vocab_size
    tok = base_tokenizer(spec)
    if chat_model_config(base.config, sft_vocab(tok)).vocab_size != model.config.vocab_size:
        name = "GPT-2's" if tok is None else f"{tok.name} (sha256 {tok.hash[:12]})"
        raise Gpt2LabError(
            f"{spec} has a {V:,}-token vocabulary (tokenizer {name}), which does not match the SFT model's "
            f"vocab_size {model.config.vocab_size:,}: fine-tune the model the run's config was made from "
            "(gpt2lab sft --model BASE takes [model] and the tokenizer from BASE)"
        )
    fresh = _fresh_rows(spec, tok, V, model.config.embedding_rows)
    trained = torch.ones(V, dtype=torch.bool)
    trained[[i for i in fresh if i < V]] = False
    target = model.state_dict()
    for key, tensor in base.state_dict().items():
        into = target.get(key)
        if into is None or into.shape[1:] != tensor.shape[1:]:
            raise Gpt2LabError(f"{spec}: weight {key} does not fit the SFT model's config")
        if tensor.dim() >= 2 and tensor.size(0) == base.config.embedding_rows:  # a row per vocabulary id
            n = min(tensor.size(0), into.size(0))
            into[:n] = tensor[:n]
            if fresh:  # the special tokens' rows were never trained: start them at the mean
                into[fresh] = tensor[:V][trained].float().mean(0).to(into.dtype)
        elif tensor.shape == into.shape:
            into.copy_(tensor)
        else:
            raise Gpt2LabError(f"{spec}: {key} has shape {tuple(tensor.shape)}, the SFT model {tuple(into.shape)}")


def is_chat_model(spec: str) -> bool:
    """True for a model fine-tuned by ``gpt2lab sft`` (its run config has [sft] data) or trained further by
    ``gpt2lab rl`` ([rl] task), or exported with the chat template; False for a base model."""
    from gpt2lab.interop.load import resolve

    kind, folder = resolve(spec)
    if kind == "checkpoint":
        config = (read_json(Path(folder) / CONFIG_NAME).get(TRAIN_STATE_KEY) or {}).get("config") or {}
        return bool((config.get("sft") or {}).get("data") or (config.get("rl") or {}).get("task"))
    tok_config = Path(folder) / "tokenizer_config.json"
    return tok_config.is_file() and "<|assistant_start|>" in str(read_json(tok_config).get("chat_template", ""))
