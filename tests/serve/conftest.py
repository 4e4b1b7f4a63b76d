"""A real `gpt2lab serve` app (uvicorn on 127.0.0.1, a free port, in a thread) around a tiny chat model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from gpt2lab.chat.base import CHAT_VOCAB_SIZE
from gpt2lab.inference.engine import Engine
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.serve.limits import ServeLimits
from gpt2lab.tokenizer.bpe import EOT_ID


def tiny_chat_model(block_size: int = 64, seed: int = 0) -> GPT:
    """An untrained chat-vocabulary model whose special tokens' head rows are 0: they are never the most likely
    token, so a greedy reply runs to max_tokens (an untrained model would end it at random)."""
    torch.manual_seed(seed)
    config = GPTConfig(
        block_size=block_size, vocab_size=CHAT_VOCAB_SIZE, padded_vocab_size=50304, n_layer=2, n_head=2, n_embd=32
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight[EOT_ID:CHAT_VOCAB_SIZE] = 0
    return model


@dataclass
class Served:
    url: str
    engine: Engine
    service: object  # gpt2lab.serve.service.Service


@contextlib.contextmanager
def serving(
    model: GPT, tokenizer, limits: ServeLimits | None = None, api_key: str | None = None, chat_model: bool = True,
    **engine_kwargs,
) -> Iterator[Served]:  # fmt: skip
    """The app served on a free local port until the block ends (the engine stops with it)."""
    from gpt2lab.serve.app import create_app, serve_in_thread
    from gpt2lab.serve.service import Service

    service = Service(Engine(model, **engine_kwargs), tokenizer, chat_model, limits or ServeLimits(), "gpt2lab")
    with serve_in_thread(create_app(service, api_key)) as url:
        yield Served(url, service.engine, service)


@pytest.fixture(scope="module")
def live_server(tokenizer):
    """A server whose tiny model decodes one step per 20 ms: a 200-token reply lasts seconds, long enough to stop."""
    model = tiny_chat_model(block_size=512)
    limits = ServeLimits(default_max_tokens=200)
    with serving(model, tokenizer, limits, max_batch=4, max_queue=8, step_delay=0.02) as served:
        yield served
