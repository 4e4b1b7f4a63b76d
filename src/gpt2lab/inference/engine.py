"""The decoding engine: many sequences, started at different times, decoded together (continuous batching).

`gpt2lab serve` runs it on a background thread (``start``, ``submit``); RL rollouts and the generative evaluations
run it to the end on their own thread (``run``). Each turn of its loop:
1. admission: waiting requests take free slots of one ``BatchKVCache``. A request's ``n`` choices of one prompt
   are a group: the first is prefilled, the others copy its keys and values when it is done (one prefill for n);
2. prefill, within a token budget per turn (``prefill_chunk``): the prompts being prefilled go through the model
   together, each row a chunk of its own prompt, so several short prompts cost one forward and a long one is
   prefilled over several turns, each turn's chunk interleaved with a decoding step (Sarathi-Serve's chunked
   prefill, Agrawal et al. 2024; vLLM's scheduler without paging). A prompt whose last chunk is in gets its first
   token at once and moves to the decoding slots;
3. one decoding step feeds every decoding sequence its last token, all rows in one forward pass, each at its own
   position and attending to its own keys; the rows are slots 0 .. n-1, so the step slices the cache, never gathers;
4. finished sequences leave (end token, length, or cancelled) and the last decoding slot moves into the hole.

Sampling is batched (``sampling.sample_rows``): each row's temperature, top-k, top-p, penalties and logit bias
apply as tensors, one uniform number per row from the sequence's own CPU ``torch.Generator`` (a seeded request
gives the tokens it would alone), one draw and one transfer to the host per step. Tokens go back through each
sequence's ``emit`` callback, on the engine's thread. A sequence may carry a ``Tool``: after each sampled token
it returns the tokens to force next (the calculator, ``gpt2lab.inference.tools``), fed one per step and marked in
``forced_at`` so training never learns them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.generate import head_for_decoding
from gpt2lab.inference.kv_cache import BatchKVCache
from gpt2lab.inference.sampling import draw_uniform, sample_rows
from gpt2lab.inference.sequence import Sequence, apply_penalties, ban_tool_tokens
from gpt2lab.model.gpt import GPT, softcap

log = logging.getLogger(__name__)
HEAD_SLICE = 2048  # vocabulary rows per slice of the LM head (several rows' logits on a CPU)


class EngineBusy(Gpt2LabError):
    """The queue of waiting sequences is full: the server answers 503, the client retries later."""


class Engine:
    """A model decoding up to ``max_batch`` sequences at once, with a bounded queue of waiting ones.

    ``prefill_chunk``: prompt tokens per turn (rows x longest chunk); ``max_len``: each sequence's positions
    (prompt + reply; default the model's context); ``autocast``: run the forward passes in bfloat16 autocast
    (CUDA); ``prefix_cache``: a new prompt starts from the keys and values a finished sequence left in a free
    slot when it continues that sequence (a conversation's next turn, a repeated system prompt), prefilling only
    the rest; ``step_delay``: seconds of sleep after each turn (tests and demos slow a tiny model down).
    """

    def __init__(
        self, model: GPT, max_batch: int = 16, max_queue: int = 64, step_delay: float = 0.0,
        prefill_chunk: int = 512, max_len: int | None = None, autocast: bool = False, prefix_cache: bool = True,
    ):  # fmt: skip
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise Gpt2LabError(
                f"max_batch and prefill_chunk must be >= 1 and max_queue >= 0 (got {max_batch}, {prefill_chunk}, "
                f"{max_queue})"
            )
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.block_size = param.device, min(max_len or model.config.block_size, model.config.block_size)
        self.autocast = autocast and param.device.type == "cuda"
        dtype = torch.bfloat16 if self.autocast else param.dtype
        self.cache = BatchKVCache(model.config, max_batch, self.block_size, param.device, dtype)
        self.head = head_for_decoding(model, steps=self.block_size)  # (C, V): one row's matrix-vector product
        # several rows: slices of the (V, C) weight, each small enough to stay in cache while all rows read it
        # (16 rows of GPT-2's head on the 2-core CPU: 31 ms in one product, 21 ms in slices of 2,048 tokens)
        weight = model.lm_head.weight[: model.config.vocab_size]
        self.head_slices = weight.split(HEAD_SLICE) if param.device.type == "cpu" else (weight,)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.step_delay = step_delay
        self.active: list[Sequence] = []  # decoding: active[i] lives in slot i of the cache
        self.prefilling: list[Sequence] = []  # admitted, prompt not all in the cache yet (any free slot)
        self.reserved = 0  # slots promised to the siblings of prefilling sequences
        self.waiting: collections.deque[list[Sequence]] = collections.deque()  # groups sharing a prompt
        self.generated_tokens = 0  # all sequences, since the start (GET /health shows it)
        self.prompt_tokens = 0  # prompt tokens prefilled (a group's shared prompt counted once)
        self.peak_running = 0  # the most sequences decoded in one step so far
        self.prefix_cache = prefix_cache
        self.cached: dict[int, list[int]] = {}  # free slot -> the tokens a finished sequence left there
        self.cached_tokens = 0  # prompt tokens found there instead of prefilled
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gpt2lab-engine", daemon=True)

    # ------------------------------------------------------------------ the callers' side

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
            waiting = sum(map(len, self.waiting))
            if waiting + len(sequences) > self.max_queue + self.max_batch - self._used():
                raise EngineBusy(
                    f"the server is busy ({len(self.active)} sequences decoding, {waiting} waiting): retry later"
                )
            self._enqueue(sequences)
            self._wake.notify()

    def run(self, sequences: list[Sequence]) -> None:
        """Decode these sequences to their end on the calling thread (RL rollouts, evaluations); errors raise."""
        if self._thread.is_alive():
            raise Gpt2LabError("this engine serves on its own thread: submit() to it instead")
        self._enqueue(sequences)
        with torch.inference_mode():
            while self.waiting or self.active or self.prefilling:
                self._turn()

    def stream(self, seq: Sequence) -> Iterator[int]:
        """Decode one sequence on the calling thread, yielding its tokens as they come (`gpt2lab chat`); closing
        the iterator early (Ctrl-C) cancels it and leaves the engine empty for the next."""
        tokens: collections.deque[int] = collections.deque()
        seq.emit = lambda token, reason: tokens.append(token) if token is not None else None
        try:
            self._enqueue([seq])
            while self.waiting or self.active or self.prefilling:
                with torch.inference_mode():
                    self._turn()
                while tokens:
                    yield tokens.popleft()
        finally:
            seq.cancelled = True  # a no-op once it has ended
            with torch.inference_mode():
                while self.waiting or self.active or self.prefilling:
                    self._turn()

    def load(self) -> dict:
        """What the engine is doing now (for GET /health)."""
        return {
            "running": len(self.active) + len(self.prefilling), "waiting": sum(map(len, self.waiting)),
            "generated_tokens": self.generated_tokens, "peak_running": self.peak_running,
        }  # fmt: skip

    def _enqueue(self, sequences: list[Sequence]) -> None:
        """Check the sequences and queue them, consecutive ones with the same prompt as one group."""
        for seq in sequences:
            if seq.max_new_tokens < 1 or not seq.prompt or len(seq.prompt) >= self.block_size:
                raise Gpt2LabError(f"a prompt of {len(seq.prompt)} tokens leaves no room in the context")
        groups: list[list[Sequence]] = []
        for seq in sequences:
            if groups and groups[-1][0].prompt == seq.prompt and len(groups[-1]) < self.max_batch:
                groups[-1].append(seq)
            else:
                groups.append([seq])
        self.waiting.extend(groups)

    def _used(self) -> int:
        return len(self.active) + len(self.prefilling) + self.reserved

    # ------------------------------------------------------------------ the engine's loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self.waiting or self.active or self.prefilling or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._turn()
                except Exception as e:  # a failed step ends its sequences, never the server
                    log.exception("decoding failed")
                    self._end_all(f"error: {type(e).__name__}: {e}", waiting=False)
                if self.step_delay:
                    time.sleep(self.step_delay)
        self._end_all("cancelled", waiting=True)

    def _end_all(self, reason: str, waiting: bool) -> None:
        groups = [[s, *s.siblings] for s in self.prefilling] + ([*map(list, self.waiting)] if waiting else [])
        for seq in self.active + [s for g in groups for s in g]:
            seq.emit(None, reason)
        self.active, self.prefilling, self.reserved = [], [], 0
        if waiting:
            self.waiting.clear()

    def _turn(self) -> None:
        """Admit, prefill one budget of prompt tokens, decode one step."""
        with self._wake:
            self._admit()
        self._prefill()
        if self.active:
            self._step()

    def _admit(self) -> None:
        """Move waiting groups into free slots, first come first served (the caller holds the lock)."""
        while self.waiting and self._used() + len(self.waiting[0]) <= self.max_batch:
            group = self.waiting.popleft()
            live = [s for s in group if not s.cancelled]
            for seq in group:
                if seq.cancelled:
                    seq.emit(None, "cancelled")
            if not live:
                continue
            for seq in live:
                seq.start(self.device, self.model.config.vocab_size)
            leader, leader.siblings = live[0], live[1:]
            leader.slot, leader.prefilled = self._reuse_slot(leader.prompt)
            self.cache.lengths[leader.slot] = leader.prefilled
            self.cached_tokens += leader.prefilled
            self.prefilling.append(leader)
            self.reserved += len(leader.siblings)

    def _free_slots(self, besides: int = -1) -> list[int]:
        """Slots past the decoding ones that no prefilling sequence holds, highest first (out of the way)."""
        taken = {s.slot for s in self.prefilling} | {besides}
        return [s for s in reversed(range(len(self.active), self.max_batch)) if s not in taken]

    def _free_slot(self, besides: int = -1) -> int:
        """A free slot to write into, one holding no finished sequence's tokens if there is one (else the oldest)."""
        free = self._free_slots(besides)
        slot = next((s for s in free if s not in self.cached), None)
        if slot is None:
            slot = next(s for s in self.cached if s in free)  # dicts keep insertion order: the oldest first
        self.cached.pop(slot, None)
        return slot

    def _reuse_slot(self, prompt: list[int]) -> tuple[int, int]:
        """(slot, tokens already in it) for a new prompt: the free slot whose finished sequence shares the longest
        prefix with it (the prefix cache), else any free slot and 0. At least the last token is left to prefill:
        its logits are the first token's."""
        best, shared = -1, 0
        for slot in self._free_slots():
            held = self.cached.get(slot, ())
            n = 0
            for a, b in zip(held, prompt[:-1]):
                if a != b:
                    break
                n += 1
            if n > shared:
                best, shared = slot, n
        if best < 0:
            return self._free_slot(), 0
        del self.cached[best]
        return best, shared

    def _forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (rows, T, C) of the planned rows; each row's tokens enter the cache."""
        autocast = torch.autocast("cuda", torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with autocast:
            return self.model.forward_hidden(idx, self.cache)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) of final hidden states (rows, C)."""
        hidden = hidden.to(self.head.dtype)
        if len(hidden) == 1:
            logits = hidden @ self.head
        else:
            logits = torch.cat([F.linear(hidden, w) for w in self.head_slices], dim=-1)
        return softcap(logits, self.model.config.logit_softcap).float()

    def _prefill(self) -> None:
        """One forward of prompt chunks, within the budget; prompts it completes get their first tokens."""
        for seq in [s for s in self.prefilling if s.cancelled and all(t.cancelled for t in s.siblings)]:
            self.prefilling.remove(seq)
            self.reserved -= len(seq.siblings)
            for s in [seq, *seq.siblings]:
                s.emit(None, "cancelled")
        rows, counts = [], []
        for seq in self.prefilling:  # first come first: rows x longest chunk within the budget
            n = min(len(seq.prompt) - seq.prefilled, self.prefill_chunk)
            if rows and (len(rows) + 1) * max(n, *counts) > self.prefill_chunk:
                break
            rows.append(seq)
            counts.append(n)
        if not rows:
            return
        idx = torch.zeros(len(rows), max(counts), dtype=torch.long)
        for i, (seq, n) in enumerate(zip(rows, counts)):
            idx[i, :n] = torch.tensor(seq.prompt[seq.prefilled : seq.prefilled + n])
        self.cache.plan([s.slot for s in rows], counts)
        hidden = self._forward(idx.to(self.device))
        self.prompt_tokens += sum(counts)
        done = []
        for i, (seq, n) in enumerate(zip(rows, counts)):
            seq.prefilled += n
            if seq.prefilled == len(seq.prompt):
                done.append(i)
        if not done:
            return
        logits = self._logits(hidden[done, [counts[i] - 1 for i in done]])  # (done, V): each prompt's last token
        started, rows_of = [], []
        for j, i in enumerate(done):
            leader = rows[i]
            self.prefilling.remove(leader)
            for seq in [leader, *leader.siblings]:
                if seq is not leader:
                    self.reserved -= 1
                    if seq.cancelled:
                        seq.emit(None, "cancelled")
                        continue
                self._to_decoding(seq, leader.slot, copy=seq is not leader)
                started.append(seq)
                rows_of.append(j)
        self._sample(started, logits[rows_of])
        self._drop_finished()

    def _to_decoding(self, seq: Sequence, src: int, copy: bool) -> None:
        """Give seq the next decoding slot, its keys and values from slot src (moved, or copied for a sibling)."""
        dst = len(self.active)
        self.cached.pop(dst, None)
        if src != dst:
            occupant = next((p for p in self.prefilling if p.slot == dst), None)
            if occupant is not None and not copy:  # a prefilling sequence holds it: they trade slots
                self.cache.swap(src, dst)
                occupant.slot = src
            else:
                if occupant is not None:  # it moves out of the way first
                    occupant.slot = self._free_slot(besides=dst)
                    self.cache.copy(dst, occupant.slot)
                self.cache.copy(src, dst)
        seq.slot = dst
        self.active.append(seq)

    def _step(self) -> None:
        """One token for every decoding sequence, in one forward pass."""
        self.peak_running = max(self.peak_running, len(self.active))
        rows = len(self.active)
        self.cache.plan(list(range(rows)), [1] * rows)
        last = torch.tensor([[s.last] for s in self.active], dtype=torch.long, device=self.device)  # (rows, 1)
        logits = self._logits(self._forward(last)[:, -1])  # (rows, V)
        self._sample(self.active, logits)
        self._drop_finished()

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Each sequence's next token from its row of logits (rows, V), drawn in one batch, then taken."""
        forced = [bool(s.pending) for s in seqs]  # a tool's tokens go first: nothing is drawn for them
        drawn = [i for i, s in enumerate(seqs) if not s.cancelled and not forced[i]]
        tokens = [s.pending.popleft() if f else -1 for s, f in zip(seqs, forced)]
        if drawn:
            part = [seqs[i] for i in drawn]
            rows = logits if len(drawn) == len(seqs) else logits[drawn]
            rows = ban_tool_tokens(rows, part)
            new = sample_rows(
                apply_penalties(rows, part),
                torch.tensor([s.temperature for s in part]),
                torch.tensor([s.top_k or 0 for s in part]),
                torch.tensor([1.0 if s.top_p is None else s.top_p for s in part]),
                torch.cat([draw_uniform(s.generator) if s.temperature else torch.zeros(1) for s in part]),
            ).tolist()  # the step's one transfer to the host
            for i, token in zip(drawn, new):
                tokens[i] = token
        self._record_logprobs(seqs, logits, tokens)
        for seq, token, was_forced in zip(seqs, tokens, forced):
            if not seq.cancelled:
                self._take(seq, token, was_forced)

    def _record_logprobs(self, seqs: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> None:
        """The model's own log-probs (before penalties and temperature) of the rows that ask, in one batch."""
        ask = [i for i, s in enumerate(seqs) if s.top_logprobs is not None and not s.cancelled]
        ask = [i for i in ask if tokens[i] not in seqs[i].end_ids]
        if not ask:
            return
        logprobs = torch.log_softmax(logits[ask].float(), dim=-1)  # (A, V)
        chosen = logprobs.gather(-1, torch.tensor([[tokens[i]] for i in ask], device=logits.device))[:, 0].tolist()
        k = max(seqs[i].top_logprobs for i in ask)
        top = torch.topk(logprobs, k) if k else None
        ids, values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
        for j, i in enumerate(ask):
            n = seqs[i].top_logprobs
            pairs = list(zip(ids[j][:n], values[j][:n])) if n else []
            seqs[i].logprobs.append((tokens[i], chosen[j], pairs))  # before emit: the reader finds it there

    def _take(self, seq: Sequence, token: int, forced: bool) -> None:
        """Emit seq's next token, or end it at an end token; a tool may ask for tokens to force next."""
        self.generated_tokens += 1
        if token in seq.end_ids and not forced:
            seq.last = -1
            return
        if seq.counts is not None:
            seq.counts[token] += 1
        if forced:
            seq.forced_at.append(len(seq.tokens))
        seq.tokens.append(token)
        seq.last = token
        seq.emit(token, None)
        if seq.stop is not None and seq.stop(seq.tokens):
            seq.last = -1
        elif seq.tool is not None and not forced:
            seq.pending.extend(seq.tool.forced(seq.tokens))

    def _finish_reason(self, seq: Sequence) -> str | None:
        if seq.cancelled:
            return "cancelled"
        if seq.last == -1:
            return "stop"
        if seq.generated >= seq.max_new_tokens or len(seq.prompt) + seq.generated >= self.block_size:
            return "length"  # prompt + reply fill the context
        return None

    def _drop_finished(self) -> None:
        """Remove finished sequences; the last decoding slot fills each hole. With the prefix cache, a finished
        sequence's keys and values stay in the freed slot (swapped there), for a prompt that continues it."""
        for slot in reversed(range(len(self.active))):
            seq = self.active[slot]
            reason = self._finish_reason(seq)
            if reason is None:
                continue
            seq.emit(None, reason)
            end = len(self.active) - 1
            if slot != end:
                (self.cache.swap if self.prefix_cache else self.cache.copy)(end, slot)
                self.active[slot] = self.active[end]
                self.active[slot].slot = slot
            self.active.pop()
            if self.prefix_cache:  # the slot holds prompt + reply but its last token (never fed)
                self.cached[end] = (seq.prompt + seq.tokens)[: self.cache.lengths[end]]
