"""The model behind `gpt2lab serve`'s routes: a request becomes a ``Job`` (its prompt rendered and fitted to the
context, its sampling and stop strings checked against the limits), then ``n`` ``engine.Sequence``s decoded by
the one ``Engine`` with everyone else's (continuous batching), whose tokens come back as ``reply.Piece``s of text.

A request that leaves ``temperature`` or ``top_k`` out is sampled as ``gpt2lab chat`` samples (``chat.defaults``).
A history longer than the context loses its oldest turns first, as in ``gpt2lab chat``. A client that disconnects
cancels its sequences: the engine stops decoding them at its next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

from fastapi import Request

from gpt2lab.chat.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from gpt2lab.chat.template import PLAIN_STOP, check_conversation, fit_history, render_plain_prompt, render_prompt
from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.engine import Engine, Sequence
from gpt2lab.serve.limits import ServeLimits
from gpt2lab.serve.reply import Piece, ReplyText
from gpt2lab.serve.schemas import APIError, ChatRequest, CompletionRequest, Sampling
from gpt2lab.tokenizer.bpe import SPECIAL_TOKENS


@dataclass
class Job:
    """A request, ready for the engine: its prompt, sampling, limits and stop strings."""

    prompt: list[int]
    max_new_tokens: int
    body: Sampling
    stops: tuple[str, ...]
    trimmed: int = 0
    chat: bool = True  # a chat reply: thinking apart from the answer
    sequences: list[Sequence] = field(default_factory=list)  # set when generation starts

    @property
    def completion_tokens(self) -> int:
        return sum(s.generated for s in self.sequences)


class Service:
    """The model behind the routes: prompt building, generation and text for one engine."""

    def __init__(self, engine: Engine, tokenizer, chat_model: bool, limits: ServeLimits, name: str):
        self.engine, self.tokenizer, self.chat_model = engine, tokenizer, chat_model
        self.limits, self.name, self.block_size = limits, name, engine.block_size
        self.think_ids = (tokenizer.special_id("<think>"), tokenizer.special_id("</think>"))
        self.end_ids = frozenset(_special_ids(tokenizer) - set(self.think_ids))  # thinking goes on, it never ends

    def requested_tokens(self, body: Sampling) -> int | None:
        """max_tokens, checked against the context and the limit."""
        n = body.max_tokens or body.max_completion_tokens
        cap = min(self.block_size - 1, self.limits.max_tokens or self.block_size)
        if n is not None and n > cap:
            why = "the limit of this server" if cap < self.block_size - 1 else "beyond the model's context"
            raise APIError(400, f"max_tokens {n} is {why} (at most {cap})", param="max_tokens")
        return n

    def check_sampling(self, body: Sampling) -> None:
        if body.n > self.limits.max_n:
            raise APIError(400, f"n {body.n} is over this server's limit of {self.limits.max_n}", param="n")
        if body.top_k is not None and body.top_k > self.limits.max_top_k:
            raise APIError(400, f"top_k {body.top_k} is over the limit of {self.limits.max_top_k}", param="top_k")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")

    def chat_job(self, body: ChatRequest) -> Job:
        self.check_sampling(body)
        messages = [m.model_dump() for m in body.messages]
        self.check_messages(messages)
        requested = self.requested_tokens(body)
        reserve = requested or min(self.limits.default_max_tokens, self.block_size // 2)
        render = render_prompt if self.chat_model else render_plain_prompt
        try:
            messages, trimmed = fit_history(messages, self.tokenizer, self.block_size - reserve, render)
        except Gpt2LabError as e:
            shortest = len(render(_last_turn(messages), self.tokenizer))  # what trimming the history keeps at least
            why = (
                f"the last message does not fit: the prompt takes {shortest} tokens and the model's context is "
                f"{self.block_size}, with {reserve} kept for the reply (max_tokens)"
            )
            raise self.no_room(shortest, requested, why, "messages") from e
        prompt = render(messages, self.tokenizer)
        max_new = min(requested or self.limits.default_max_tokens, self.block_size - len(prompt))
        stops = _stops(body) + (() if self.chat_model else (PLAIN_STOP,))
        return Job(prompt, max_new, body, stops, trimmed)

    def check_messages(self, messages: list[dict]) -> None:
        lim = self.limits
        if len(messages) > lim.max_messages:
            raise APIError(400, f"{len(messages)} messages: the limit is {lim.max_messages}", param="messages")
        for i, m in enumerate(messages):
            if len(m["content"]) > lim.max_message_chars:
                raise APIError(400, f"message {i}: over {lim.max_message_chars} characters", param="messages")
        if sum(len(m["content"]) for m in messages) > lim.max_total_chars:
            raise APIError(400, f"the messages hold over {lim.max_total_chars} characters", param="messages")
        try:
            check_conversation(messages, generation=True)
        except Gpt2LabError as e:
            raise APIError(400, str(e), param="messages") from e

    def completion_job(self, body: CompletionRequest) -> Job:
        self.check_sampling(body)
        if len(body.prompt) > self.limits.max_total_chars:
            raise APIError(400, f"the prompt holds over {self.limits.max_total_chars} characters", param="prompt")
        requested = self.requested_tokens(body)
        prompt = self.tokenizer.encode_ordinary(body.prompt) or [self.tokenizer.eot]
        room = self.block_size - len(prompt)
        if room < (requested or 1):
            why = f"the prompt does not fit: it takes {len(prompt)} tokens and the model's context is {self.block_size}"
            raise self.no_room(len(prompt), requested, why, "prompt")
        return Job(prompt, min(requested or self.limits.default_max_tokens, room), body, _stops(body), chat=False)

    def no_room(self, prompt_tokens: int, requested: int | None, why: str, param: str) -> APIError:
        """The prompt and the reply do not fit the context together: the error blames max_tokens when the
        prompt alone would fit (the user asked for too long a reply), else the prompt (``why``, ``param``)."""
        block = self.block_size
        if requested and prompt_tokens < block:
            param, why = "max_tokens", (
                f"max_tokens {requested} leaves no room for the prompt: the prompt takes {prompt_tokens} tokens and "
                f"the model's context is {block}, so max_tokens can be at most {block - prompt_tokens} here"
            )  # fmt: skip
        return APIError(400, why, param=param, code="context_length_exceeded")

    async def generate(self, job: Job, request: Request) -> AsyncIterator[Piece]:
        """The reply's pieces as they come, each choice ending with one that has a finish_reason; the
        sequences end with this iterator (a client gone, or a stop string reached, cancels them)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(i: int, token: int | None, reason: str | None) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, token, reason))
            except RuntimeError:  # the event loop has closed (the server stopped): nobody is listening
                pass

        b = job.body
        top_p = None if b.top_p in (None, 1) else b.top_p
        # what a request leaves out is sampled as `gpt2lab chat` samples: the same model reads the same
        temperature = DEFAULT_TEMPERATURE if b.temperature is None else b.temperature
        top_k = min(DEFAULT_TOP_K, self.limits.max_top_k) if b.top_k is None else b.top_k or None
        seqs = [
            Sequence(
                job.prompt,
                job.max_new_tokens,
                partial(emit, i),
                temperature,
                top_k,
                top_p,
                None if b.seed is None else b.seed + i,
                self.end_ids,
            )  # fmt: skip
            for i in range(b.n)
        ]
        texts = [ReplyText(self.tokenizer, job.stops, self.think_ids if job.chat else None) for _ in seqs]
        self.engine.submit(seqs)
        job.sequences = seqs
        open_, checked = set(range(b.n)), time.monotonic()
        try:
            while open_:
                if time.monotonic() - checked > 0.25:  # the client may be gone (streaming or not)
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                try:
                    i, token, reason = await asyncio.wait_for(queue.get(), timeout=0.25)
                except TimeoutError:
                    continue
                if i not in open_:
                    continue
                if token is not None:
                    piece = texts[i].push(token)
                    if piece.finish_reason is None:
                        if piece.text or piece.reasoning:
                            yield Piece(i, piece.text, piece.reasoning)
                        continue
                    seqs[i].cancelled = True  # a stop string: the engine drops the sequence at its next step
                else:
                    if reason.startswith("error"):
                        raise APIError(500, f"generation failed ({reason})", type="server_error")
                    piece = texts[i].flush("length" if reason == "length" else "stop")
                open_.discard(i)
                yield Piece(i, piece.text, piece.reasoning, piece.finish_reason)
        finally:
            for seq in seqs:
                seq.cancelled = True  # a no-op for finished ones; stops those of a client that left


def _special_ids(tokenizer) -> set[int]:
    """<|endoftext|> and every special token the tokenizer has: a reply ends at any of them."""
    ids = {tokenizer.eot}
    for token in SPECIAL_TOKENS:
        try:
            ids.add(tokenizer.special_id(token))
        except Gpt2LabError:
            pass
    return ids


def _last_turn(messages: list[dict]) -> list[dict]:
    """The system message, if any, and the last message (a user's): the shortest history ``fit_history`` keeps."""
    return (messages[:1] if messages[0]["role"] == "system" else []) + messages[-1:]


def _stops(body: Sampling) -> tuple[str, ...]:
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
