"""Small models for the evaluation tests: tiny random GPTs and hand-built ones whose answers are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT


def tiny_gpt(seed: int = 0, block_size: int = 128) -> GPT:
    """A random 2-layer GPT with the real 50257 vocabulary, in eval mode."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=64)).eval()


def silence_blocks(model: GPT) -> None:
    """Zero every block's output projections, so the residual stream is just the embeddings."""
    for block in model.transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)


def unigram_gpt(logits: dict[int, float]) -> GPT:
    """A GPT whose next-token logits are the same at every position: ``logits[id]``, 0 for other ids.

    ln_f's weight is zeroed, so the final hidden state is ln_f's bias e_0 whatever the input;
    the (tied) LM head then gives logit = wte[id, 0].
    """
    model = tiny_gpt()
    with torch.no_grad():
        silence_blocks(model)
        model.lm_head.weight.zero_()  # tied: also the input embedding, which ln_f ignores now
        for token, value in logits.items():
            model.lm_head.weight[token, 0] = value
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
    return model


def positional_gpt(predict: dict[int, int], strength: float = 10.0) -> GPT:
    """A GPT whose argmax at input position p is ``predict[p]``, whatever the input tokens.

    Blocks silenced and the token embedding untied and zeroed, so the hidden state at p is
    LayerNorm(e_p) ~ 7.9 e_p - 0.12; LM head row ``predict[p]`` holds ``strength`` in column p,
    giving that token a logit of ~79 at p (every other token: ~0 or below).
    """
    model = tiny_gpt(block_size=64)  # n_embd 64: one direction per position
    with torch.no_grad():
        silence_blocks(model)
        model.transformer.wte = nn.Embedding(model.config.vocab_size, model.config.n_embd)  # untied
        nn.init.zeros_(model.transformer.wte.weight)
        model.transformer.wpe.weight.copy_(torch.eye(64))
        model.lm_head.weight.zero_()
        for pos, token in predict.items():
            model.lm_head.weight[token, pos] += strength
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A gpt2lab checkpoint folder of tiny_gpt()."""
    from gpt2lab.checkpoint.folder import save_model

    folder = tmp_path_factory.mktemp("tiny_ckpt")
    save_model(tiny_gpt(), folder)
    return folder


@pytest.fixture(scope="session")
def hellaswag_file(shared_data):
    return shared_data / "hellaswag" / "hellaswag_val_from_text.jsonl"


@pytest.fixture(scope="session")
def lambada_file(shared_data):
    return shared_data / "lambada" / "lambada_test.jsonl"
