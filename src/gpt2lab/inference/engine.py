"""Continuous batching: many sequences, started at different times, decoded together in one batch.

The server submits ``Sequence``s; one background thread runs the model. Each turn of its loop:
1. admit waiting sequences into free slots: each prompt is prefilled alone (a batch-1 ``KVCache``),
   copied into its slot of the ``BatchKVCache`` and its first token sampled at once;
2. one decoding step feeds every active sequence its last token, all rows in one forward pass, each
   row at its own position and attending to its own keys only;
3. finished sequences leave (end token, length, or cancelled by the client), and the last active
   slot moves into the hole, so the active rows stay 0 .. n-1 and the next step slices, never gathers.

A slot freed by a finished sequence is refilled at the next turn by a waiting one (Orca, Yu et al.
2022; vLLM's scheduler without paging). Tokens go back through each sequence's ``emit`` callback,
called on the engine thread: the server hands them to its event loop. Every sequence samples with its
own settings and its own ``torch.Generator``, so a seeded request gives the tokens it would alone.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.generate import head_for_decoding, last_logits, sample_next
from gpt2lab.inference.kv_cache import BatchKVCache, KVCache
from gpt2lab.model.gpt import GPT

log = logging.getLogger(__name__)


class EngineBusy(Gpt2LabError):
    """The queue of waiting sequences is full: the server answers 503, the client retries later."""


@dataclass(eq=False)
class Sequence:
    """One completion to generate, and where its tokens go.

    ``emit(token, None)`` is called for every token sampled (end tokens excluded), then once
    ``emit(None, reason)`` with reason "stop" (an end token), "length" (max_new_tokens or the context
    is used up), "cancelled" or "error: ...". Set ``cancelled`` from any thread to stop it.
    """

    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[int | None, str | None], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    end_ids: frozenset[int] = frozenset()
    presence_penalty: float = 0.0  # OpenAI's penalties, over the tokens this sequence has generated
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    top_logprobs: int | None = None  # set: each emitted token's log-prob and the top ones go to ``logprobs``
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)  # (token, lp, top)
    cancelled: bool = False
    generated: int = 0
    last: int = -1  # the token fed at the next step
    generator: torch.Generator | None = field(default=None, repr=False)
    counts: torch.Tensor | None = field(default=None, repr=False)  # (V,) times each token was generated
    bias: torch.Tensor | None = field(default=None, repr=False)  # (V,) logit_bias as a dense row

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (1, V) with OpenAI's penalties and logit_bias applied, as OpenAI defines them:
        logits[j] - frequency_penalty * count[j] - presence_penalty * (count[j] > 0) + logit_bias[j]."""
        if self.counts is None:
            return logits
        counts = self.counts
        return logits.float() - self.frequency_penalty * counts - self.presence_penalty * (counts > 0) + self.bias


class Engine:
    """A model decoding up to ``max_batch`` sequences at once, with a bounded queue of waiting ones."""

    def __init__(self, model: GPT, max_batch: int = 16, max_queue: int = 64, step_delay: float = 0.0):
        if max_batch < 1 or max_queue < 0:
            raise Gpt2LabError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.block_size = param.device, model.config.block_size
        self.cache = BatchKVCache(model.config, max_batch, self.block_size, param.device, param.dtype)
        self.head = head_for_decoding(model, steps=self.block_size)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.step_delay = step_delay  # seconds of sleep after each step: tests and demos slow a tiny model down
        self.active: list[Sequence] = []  # active[i] lives in slot i of the cache
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.generated_tokens = 0  # all sequences, since the start (GET /health shows it)
        self.peak_running = 0  # the most sequences decoded in one step so far
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gpt2lab-engine", daemon=True)

    # ------------------------------------------------------------------ the server's side

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences of one request, all or none: EngineBusy when the queue has no room."""
        with self._wake:
            if len(self.waiting) + len(sequences) > self.max_queue + self.max_batch - len(self.active):
                raise EngineBusy(
                    f"the server is busy ({len(self.active)} sequences decoding, {len(self.waiting)} waiting): "
                    "retry later"
                )
            for seq in sequences:
                if seq.max_new_tokens < 1 or not seq.prompt or len(seq.prompt) >= self.block_size:
                    raise Gpt2LabError(f"a prompt of {len(seq.prompt)} tokens leaves no room in the context")
            self.waiting.extend(sequences)
            self._wake.notify()

    def load(self) -> dict:
        """What the engine is doing now (for GET /health)."""
        return {
            "running": len(self.active), "waiting": len(self.waiting),
            "generated_tokens": self.generated_tokens, "peak_running": self.peak_running,
        }  # fmt: skip

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self.waiting or self.active or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        break
                    admitted = []
                    while self.waiting and len(self.active) + len(admitted) < self.max_batch:
                        admitted.append(self.waiting.popleft())
                try:
                    for seq in admitted:
                        self._prefill(seq)
                    if self.active:
                        self._step()
                except Exception as e:  # a failed step ends its sequences, never the server
                    log.exception("decoding failed")
                    for seq in self.active + [s for s in admitted if s not in self.active]:
                        seq.emit(None, f"error: {type(e).__name__}: {e}")
                    self.active, self.cache.rows = [], 0
                if self.step_delay:
                    time.sleep(self.step_delay)
        for seq in self.active + list(self.waiting):
            seq.emit(None, "cancelled")

    def _prefill(self, seq: Sequence) -> None:
        """Run the prompt alone, move its keys and values into the next free slot, sample its first token."""
        if seq.cancelled:
            seq.emit(None, "cancelled")
            return
        seq.generator = torch.Generator(device=self.device)
        if seq.seed is None:
            seq.generator.seed()
        else:
            seq.generator.manual_seed(seq.seed)
        if seq.presence_penalty or seq.frequency_penalty or seq.logit_bias:
            vocab = self.model.config.vocab_size
            seq.counts = torch.zeros(vocab, device=self.device)
            seq.bias = torch.zeros(vocab, device=self.device)
            for token, bias in seq.logit_bias.items():
                seq.bias[token] = bias
        alone = KVCache(self.model.config, 1, len(seq.prompt), self.device, self.cache.k.dtype)
        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        logits = last_logits(self.model, ids, alone, self.head)  # (1, V)
        slot = len(self.active)
        self.cache.load(slot, alone)
        self.active.append(seq)
        self.cache.rows = len(self.active)
        self._accept(slot, logits)
        self._drop_finished()

    def _step(self) -> None:
        """One token for every active sequence, in one forward pass."""
        self.peak_running = max(self.peak_running, len(self.active))
        last = torch.tensor([[s.last] for s in self.active], dtype=torch.long, device=self.device)  # (rows, 1)
        logits = last_logits(self.model, last, self.cache, self.head)  # (rows, V)
        for slot in range(len(self.active)):
            self._accept(slot, logits[slot : slot + 1])
        self._drop_finished()

    def _accept(self, slot: int, logits: torch.Tensor) -> None:
        """Sample slot's next token from its logits (1, V); emit it or finish the sequence."""
        seq = self.active[slot]
        if seq.cancelled:
            return
        token = int(sample_next(seq.adjust(logits), seq.temperature, seq.top_k, seq.top_p, seq.generator)[0])
        self.generated_tokens += 1
        if token in seq.end_ids:
            seq.last = -1
            return
        if seq.counts is not None:
            seq.counts[token] += 1
        if seq.top_logprobs is not None:  # the model's own distribution: before penalties and temperature
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)  # (V,)
            top = torch.topk(logprobs, seq.top_logprobs) if seq.top_logprobs else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            seq.logprobs.append((token, float(logprobs[token]), pairs))  # before emit: the reader finds it there
        seq.generated += 1
        seq.last = token
        seq.emit(token, None)

    def _finish_reason(self, slot: int) -> str | None:
        seq = self.active[slot]
        if seq.cancelled:
            return "cancelled"
        if seq.last == -1:
            return "stop"
        if seq.generated >= seq.max_new_tokens or len(seq.prompt) + seq.generated >= self.block_size:
            return "length"  # prompt + reply fill the context
        return None

    def _drop_finished(self) -> None:
        """Remove finished sequences; the last active slot fills each hole."""
        for slot in reversed(range(len(self.active))):
            reason = self._finish_reason(slot)
            if reason is None:
                continue
            self.active[slot].emit(None, reason)
            end = len(self.active) - 1
            if slot != end:
                self.cache.move(end, slot)
                self.active[slot] = self.active[end]
            self.active.pop()
            self.cache.rows = len(self.active)
