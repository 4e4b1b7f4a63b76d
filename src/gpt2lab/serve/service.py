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
from gpt2lab.chat.template import (
    PLAIN_STOP,
    call_marks,
    check_conversation,
    fit_history,
    render_plain_prompt,
    render_prompt,
)
from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.engine import Engine, Sequence
from gpt2lab.inference.tools import Calculator
from gpt2lab.serve.limits import ServeLimits
from gpt2lab.serve.reply import Piece, ReplyText
from gpt2lab.serve.schemas import APIError, ChatRequest, CompletionRequest, Message, Sampling, unsupported
from gpt2lab.tokenizer.bpe import SPECIAL_TOKENS


@dataclass
class Job:
    """A request, ready for the engine: its prompts, sampling, limits and stop strings.

    Choice ``p * n + j`` is the j-th of prompt p's n choices (OpenAI's order for a list of prompts)."""

    prompts: list[list[int]]
    max_new_tokens: int  # for each choice, never past the context left after its prompt
    body: Sampling
    stops: tuple[str, ...]
    trimmed: int = 0
    chat: bool = True  # a chat reply: thinking apart from the answer
    sequences: list[Sequence] = field(default_factory=list)  # set when generation starts

    @property
    def prompt(self) -> list[int]:
        return self.prompts[0]

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.body.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(s.generated for s in self.sequences)

    @property
    def echo(self) -> bool:
        return not self.chat and bool(self.body.echo)

    @property
    def lists_end(self) -> bool:
        """A completion's log-probs list the end token that stopped it, as OpenAI's and vLLM's do (lm-eval reads
        the last entry as the generated token's): the engine passes it on, and the reply ends here at it."""
        return not self.chat and self.top_logprobs is not None

    @property
    def top_logprobs(self) -> int | None:
        """How many top tokens each token's log-probs list; None: no log-probs."""
        b = self.body
        if self.chat:
            return (b.top_logprobs or 0) if b.logprobs else None
        return b.logprobs


class Service:
    """The model behind the routes: prompt building, generation and text for one engine."""

    def __init__(self, engine: Engine, tokenizer, chat_model: bool, limits: ServeLimits, name: str):
        self.engine, self.tokenizer, self.chat_model = engine, tokenizer, chat_model
        self.limits, self.name, self.block_size = limits, name, engine.block_size
        self.think_ids = (tokenizer.special_id("<think>"), tokenizer.special_id("</think>"))
        # a chat model calls the calculator (inference.tools): its tokens show as <<48/2=24>> and never end a reply
        self.marks = call_marks(tokenizer) if chat_model else {}
        self.calculator = Calculator(tokenizer) if chat_model else None
        self.end_ids = frozenset(_special_ids(tokenizer) - set(self.think_ids) - set(self.marks))  # thinking goes on

    def requested_tokens(self, body: Sampling) -> int | None:
        """max_tokens, checked against the context and the limit."""
        n = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        if n == 0 and not getattr(body, "echo", False):
            raise APIError(400, "max_tokens 0 asks for no text: it is only for scoring a prompt (echo: true)",
                           param="max_tokens")  # fmt: skip
        cap = min(self.block_size - 1, self.limits.max_tokens or self.block_size)
        if n is not None and n > cap:
            why = "the limit of this server" if cap < self.block_size - 1 else "beyond the model's context"
            raise APIError(400, f"max_tokens {n} is {why} (at most {cap})", param="max_tokens")
        return n

    def check_model(self, model: str | None) -> None:
        """A request may leave the model out; one naming another model gets OpenAI's (and vLLM's) 404."""
        if model is not None and model != self.name:
            raise APIError(
                404, f"The model `{model}` does not exist: this server serves `{self.name}`.", param="model",
                code="model_not_found",
            )  # fmt: skip

    def check_sampling(self, body: Sampling) -> None:
        self.check_model(body.model)
        if (refused := unsupported(body)) is not None:
            raise refused
        self.check_logit_bias(body.logit_bias or {})
        if body.stream_options is not None and not body.stream:  # as OpenAI answers it
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if body.n > self.limits.max_n:
            raise APIError(400, f"n {body.n} is over this server's limit of {self.limits.max_n}", param="n")
        if body.top_k is not None and body.top_k > self.limits.max_top_k:
            raise APIError(400, f"top_k {body.top_k} is over the limit of {self.limits.max_top_k}", param="top_k")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")

    def check_logit_bias(self, bias: dict[str, float]) -> None:
        vocab = self.engine.model.config.vocab_size
        for key, value in bias.items():
            if not (key.isdigit() and int(key) < vocab):
                why = f"logit_bias: {key!r} is not a token id (an integer from 0 to {vocab - 1}, as a string)"
                raise APIError(400, why, param="logit_bias")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias[{key!r}]: {value} is outside [-100, 100]", param="logit_bias")

    def chat_job(self, body: ChatRequest) -> Job:
        self.check_sampling(body)
        messages = [plain_message(m, i) for i, m in enumerate(body.messages)]
        self.check_messages(messages)
        requested = self.requested_tokens(body)
        reserve = requested or min(self.limits.default_max_tokens, self.block_size // 2)
        render = render_prompt if self.chat_model else render_plain_prompt
        try:
            messages, trimmed = fit_history(
                messages, self.tokenizer, self.block_size - reserve, render, tools=self.chat_model
            )
        except Gpt2LabError as e:
            shortest = len(render(_last_turn(messages), self.tokenizer))  # what trimming the history keeps at least
            why = (
                f"the last message does not fit: the prompt takes {shortest} tokens and the model's context is "
                f"{self.block_size}, with {reserve} kept for the reply (max_tokens)"
            )
            raise self.no_room(shortest, requested, why, "messages") from e
        prompt = render(messages, self.tokenizer, tools=True) if self.chat_model else render(messages, self.tokenizer)
        max_new = requested or self.limits.default_max_tokens
        stops = _stops(body) + (() if self.chat_model else (PLAIN_STOP,))
        return Job([prompt], max_new, body, stops, trimmed)

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
        requested = self.requested_tokens(body)
        prompts = self.completion_prompts(body.prompt)
        block = self.block_size
        for prompt in prompts:
            room = block - len(prompt)
            if room < (1 if requested is None else requested) or room < 0:
                why = f"the prompt does not fit: it takes {len(prompt)} tokens and the model's context is {block}"
                raise self.no_room(len(prompt), requested, why, "prompt")
        max_new = self.limits.default_max_tokens if requested is None else requested
        return Job(prompts, max_new, body, _stops(body), chat=False)

    def completion_prompts(self, prompt: str | list) -> list[list[int]]:
        """Token ids of each prompt: a text, texts, token ids, or lists of token ids (an empty text: <|endoftext|>)."""
        if not prompt and isinstance(prompt, list):
            raise APIError(400, "prompt: an empty list holds no prompt", param="prompt")
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        if len(prompts) > self.limits.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts: the limit is {self.limits.max_prompts}", param="prompt")
        if sum(len(p) for p in prompts if isinstance(p, str)) > self.limits.max_total_chars:
            raise APIError(400, f"the prompt holds over {self.limits.max_total_chars} characters", param="prompt")
        vocab = self.engine.model.config.vocab_size
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, list) and any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"prompt {i}: token ids must be in [0, {vocab})", param="prompt")
            ids.append((self.tokenizer.encode_ordinary(p) if isinstance(p, str) else p) or [self.tokenizer.eot])
        return ids

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

    def sequences(self, job: Job, emit) -> list[Sequence]:
        """One engine sequence per choice: choice i continues prompt i // n and samples with seed + i."""
        b = job.body
        top_p = None if b.top_p in (None, 1) else b.top_p
        # what a request leaves out is sampled as `gpt2lab chat` samples: the same model reads the same
        temperature = DEFAULT_TEMPERATURE if b.temperature is None else b.temperature
        top_k = min(DEFAULT_TOP_K, self.limits.max_top_k) if b.top_k is None else b.top_k or None
        bias = {int(k): v for k, v in (b.logit_bias or {}).items()}
        seqs = []
        for i in range(job.choices):
            prompt = job.prompts[i // b.n]
            seqs.append(Sequence(
                prompt, min(job.max_new_tokens, self.block_size - len(prompt)), partial(emit, i), temperature,
                top_k, top_p, None if b.seed is None else b.seed + i, frozenset() if job.lists_end else self.end_ids,
                presence_penalty=b.presence_penalty or 0.0, frequency_penalty=b.frequency_penalty or 0.0,
                logit_bias=bias, top_logprobs=job.top_logprobs, tool=self.calculator if job.chat else None,
            ))  # fmt: skip
        return seqs

    async def generate(self, job: Job, request: Request) -> AsyncIterator[Piece]:
        """The reply's pieces as they come, each choice ending with one that has a finish_reason; the
        sequences end with this iterator (a client gone, or a stop string reached, cancels them)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(i: int, token: int | None, reason: str | None) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, token, reason))
            except RuntimeError:  # the event loop has closed (the server stopped): nobody is listening
                pass

        if job.max_new_tokens == 0:  # max_tokens 0 with echo: the prompt is scored, nothing is generated
            for i in range(job.choices):
                yield Piece(i, finish_reason="length")
            return
        seqs = self.sequences(job, emit)
        texts = [ReplyText(self.tokenizer, job.stops, self.think_ids if job.chat else None, self.marks) for _ in seqs]
        self.engine.submit(seqs)
        job.sequences = seqs
        open_, checked = set(range(len(seqs))), time.monotonic()
        pushed, sent = [0] * len(seqs), [0] * len(seqs)  # tokens read from the queue, and whose log-probs went out

        def piece_of(i: int, text: str, reasoning: str, reason: str | None = None) -> Piece:
            entries = seqs[i].logprobs[sent[i] : pushed[i]]  # the engine appends each before emitting it
            sent[i] = pushed[i]
            return Piece(i, text, reasoning, reason, entries)

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
                if token is not None and job.lists_end and token in self.end_ids:  # its log-prob, no text
                    pushed[i] += 1
                    seqs[i].cancelled = True
                    piece = texts[i].flush("stop")
                elif token is not None:
                    pushed[i] += 1
                    piece = texts[i].push(token)
                    if piece.finish_reason is None:
                        if piece.text or piece.reasoning:
                            yield piece_of(i, piece.text, piece.reasoning)
                        continue
                    seqs[i].cancelled = True  # a stop string: the engine drops the sequence at its next step
                else:
                    if reason.startswith("error"):
                        raise APIError(500, f"generation failed ({reason})", type="server_error")
                    piece = texts[i].flush("length" if reason == "length" else "stop")
                open_.discard(i)
                yield piece_of(i, piece.text, piece.reasoning, piece.finish_reason)
        finally:
            for seq in seqs:
                seq.cancelled = True  # a no-op for finished ones; stops those of a client that left


def plain_message(message: Message, i: int) -> dict:
    """{"role", "content"} with content a string: text parts joined by newlines (as vLLM joins them), and the
    ``developer`` role (OpenAI's newer name for system instructions) read as ``system``."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a {kind!r} part" if isinstance(kind, str) else "a part that is not {type: text, text}"
                raise APIError(400, f"messages.{i}.content.{j}: {what}: this model reads text only",
                               param=f"messages.{i}.content.{j}")  # fmt: skip
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        why = f"messages.{i}.content: must be a string or a list of text parts"
        raise APIError(400, why, param=f"messages.{i}.content")
    return {"role": "system" if message.role == "developer" else message.role, "content": content}


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
