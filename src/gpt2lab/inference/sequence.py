"""One completion the engine decodes (``Sequence``): its prompt, its sampling settings, where its tokens go, and a
tool's hook; and the changes its settings make to its row of logits before the batch is sampled (OpenAI's penalties
and logit bias, the tokens its tool alone writes)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from gpt2lab.inference.sampling import seeded_generator


class Tool(Protocol):
    """What a sequence's tool does: tokens to force after each sampled token, and tokens only it may write."""

    banned: tuple[int, ...]  # never sampled (a calculator's output markers): the model cannot fake an answer

    def forced(self, tokens: list[int]) -> list[int]: ...


@dataclass(eq=False)
class Sequence:
    """One completion to generate, and where its tokens go.

    ``emit(token, None)`` is called for every token (end tokens excluded), then once ``emit(None, reason)`` with
    reason "stop" (an end token), "length" (max_new_tokens or the context is used up), "cancelled" or
    "error: ..." (by default nowhere: RL and the evaluations read ``tokens`` at the end). Set ``cancelled`` from any
    thread to stop it. ``tokens`` holds what was emitted; ``last`` is -1 once it has ended with "stop".
    """

    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[int | None, str | None], None] = field(default=lambda token, reason: None, repr=False)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    end_ids: frozenset[int] = frozenset()
    presence_penalty: float = 0.0  # OpenAI's penalties, over the tokens this sequence has generated
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    top_logprobs: int | None = None  # set: each emitted token's log-prob and the top ones go to ``logprobs``
    tool: Tool | None = None  # tokens so far -> tokens to force next (a tool's output)
    stop: Callable[[list[int]], bool] | None = None  # tokens so far -> True: it ends here ("stop")
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)  # (token, lp, top)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)  # emitted so far
    forced_at: list[int] = field(default_factory=list)  # indices into tokens of the ones a tool forced
    last: int = -1  # the token fed at the next step (-1: an end token was drawn)
    generator: torch.Generator | None = field(default=None, repr=False)
    counts: torch.Tensor | None = field(default=None, repr=False)  # (V,) times each token was generated
    bias: torch.Tensor | None = field(default=None, repr=False)  # (V,) logit_bias as a dense row
    # the engine's bookkeeping
    slot: int = -1  # its rows in the cache
    prefilled: int = 0  # prompt tokens in the cache
    siblings: list[Sequence] = field(default_factory=list, repr=False)  # same prompt: they copy this one's prefill
    pending: collections.deque = field(default_factory=collections.deque, repr=False)  # forced tokens to feed

    @property
    def generated(self) -> int:
        return len(self.tokens)

    def start(self, device, vocab: int) -> None:
        """Its generator and, with penalties or a logit bias, its dense rows."""
        self.generator = seeded_generator(self.seed)
        if self.presence_penalty or self.frequency_penalty or self.logit_bias:
            self.counts = torch.zeros(vocab, device=device)
            self.bias = torch.zeros(vocab, device=device)
            for token, bias in self.logit_bias.items():
                self.bias[token] = bias


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Logits (B, V) with OpenAI's penalties and logit_bias, for the rows that set them, as OpenAI defines them:
    logits[j] - frequency_penalty * count[j] - presence_penalty * (count[j] > 0) + logit_bias[j]."""
    rows = [i for i, s in enumerate(seqs) if s.counts is not None]
    if not rows:
        return logits
    logits = logits.float().clone()
    counts = torch.stack([seqs[i].counts for i in rows])  # (R, V)
    bias = torch.stack([seqs[i].bias for i in rows])
    frequency = logits.new_tensor([seqs[i].frequency_penalty for i in rows])[:, None]
    presence = logits.new_tensor([seqs[i].presence_penalty for i in rows])[:, None]
    logits[rows] = logits[rows] - frequency * counts - presence * (counts > 0) + bias
    return logits


def ban_tool_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Logits (B, V) with the tokens each row's tool alone writes set to -inf."""
    banned = [(i, t) for i, s in enumerate(seqs) if s.tool is not None for t in s.tool.banned]
    if not banned:
        return logits
    logits = logits.clone()
    rows, tokens = zip(*banned)
    logits[list(rows), list(tokens)] = float("-inf")
    return logits
