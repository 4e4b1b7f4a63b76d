"""OpenAI's response objects for a ``Job``: the whole ``chat.completion`` / ``text_completion`` as JSON, or,
with ``stream: true``, server-sent events of its chunks ending ``data: [DONE]`` (an error after the status is
sent goes in the stream, as OpenAI's does)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from gpt2lab import __version__
from gpt2lab.serve.logprobs import chat_logprobs, legacy_logprobs, prompt_entries
from gpt2lab.serve.schemas import APIError, error_body
from gpt2lab.serve.service import Job, Service

# OpenAI's name for the backend configuration that produced a response: the code version serving it
SYSTEM_FINGERPRINT = f"gpt2lab-{__version__}"


def _usage(job: Job) -> dict:
    usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens}
    usage["total_tokens"] = usage["prompt_tokens"] + job.completion_tokens
    if job.trimmed:
        usage["trimmed_messages"] = job.trimmed  # an extension: oldest messages dropped to fit the context
    return usage


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Logprobs:
    """A choice's log-probs as its pieces come, in the endpoint's shape (None when not asked for); the legacy
    shape's text offsets run on from piece to piece, counted in the prompt + completion text, as OpenAI's."""

    def __init__(self, tokenizer, job: Job, offset: int):
        self.tokenizer, self.chat, self.wanted, self.offset = tokenizer, job.chat, job.top_logprobs is not None, offset

    def of(self, entries: list, ids: list[int] | None = None) -> dict | None:
        if not self.wanted:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, entries)
        shaped = legacy_logprobs(self.tokenizer, ids or [e[0] for e in entries], entries, self.offset)
        self.offset += sum(len(t) for t in shaped["tokens"])
        return shaped


async def _echoes(service: Service, job: Job) -> list[tuple[str, list[int], list]]:
    """For each prompt: (its text, its ids, its log-prob entries) when echo asks for it, else ("", [], [])."""
    if not job.echo:
        return [("", [], [])] * len(job.prompts)
    out = []
    for ids in job.prompts:
        entries = []
        if job.top_logprobs is not None:  # one forward pass, off the event loop
            entries = await asyncio.to_thread(prompt_entries, service.engine.model, ids, job.top_logprobs)
        out.append((service.tokenizer.decode(ids), ids, entries))
    return out


def _first_offset(service: Service, job: Job, prompt: int) -> int:
    """Where a completion's first token starts in prompt + completion: after the prompt unless echoed."""
    if job.chat or job.echo or job.top_logprobs is None:
        return 0
    return len(service.tokenizer.decode(job.prompts[prompt]))


async def respond(service: Service, job: Job, request: Request, chat: bool) -> JSONResponse | StreamingResponse:
    """The whole answer as JSON, or a stream of chunks: OpenAI's chat.completion or text_completion."""
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": ("chat.completion" if chat else "text_completion") + (".chunk" if chat and job.body.stream else ""),
        "created": int(time.time()),
        "model": service.name,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    echoes = await _echoes(service, job)
    n = job.body.n
    shapes = [Logprobs(service.tokenizer, job, _first_offset(service, job, i // n)) for i in range(job.choices)]
    events = service.generate(job, request)
    if job.body.stream:
        first = await anext_or_none(events)  # errors before the first token (a full queue) are still a 4xx/5xx
        stream = _stream(job, head, chat, first, events, [echoes[i // n] for i in range(job.choices)], shapes)
        return StreamingResponse(stream, media_type="text/event-stream")
    texts, thoughts, reasons = [""] * job.choices, [""] * job.choices, [None] * job.choices
    entries = [[] for _ in range(job.choices)]
    async for piece in events:
        texts[piece.index] += piece.text
        thoughts[piece.index] += piece.reasoning
        reasons[piece.index] = piece.finish_reason or reasons[piece.index]
        entries[piece.index] += piece.logprobs
    choices = []
    for i, (text, thought, reason) in enumerate(zip(texts, thoughts, reasons)):
        if chat:
            message = {"role": "assistant", "content": text} | ({"reasoning_content": thought} if thought else {})
            choices.append(
                {"index": i, "message": message, "finish_reason": reason, "logprobs": shapes[i].of(entries[i])}
            )
        else:
            echo_text, echo_ids, echo_entries = echoes[i // n]
            ids = echo_ids + [e[0] for e in entries[i]]
            logprobs = shapes[i].of((echo_entries or [None] * len(echo_ids)) + entries[i], ids)
            choices.append({"index": i, "text": echo_text + text, "finish_reason": reason, "logprobs": logprobs})
    return JSONResponse({**head, "choices": choices, "usage": _usage(job)})


async def anext_or_none(events: AsyncIterator):
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


async def _stream(job: Job, head: dict, chat: bool, first, events, echoes: list, shapes: list) -> AsyncIterator[str]:
    if job.body.stream_options and job.body.stream_options.include_usage:
        head = {**head, "usage": None}  # as OpenAI streams: every chunk has usage, null until the last one

    def chunk(i: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> str:
        if chat:
            choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
        else:
            choice = {"index": i, "text": delta.get("content", ""), "finish_reason": reason, "logprobs": logprobs}
        return _sse({**head, "choices": [choice]})

    try:
        for i in range(job.choices):
            if chat:
                yield chunk(i, {"role": "assistant", "content": ""})
            elif echoes[i][1]:  # echo: the prompt first, with its log-probs
                text, ids, entries = echoes[i]
                yield chunk(i, {"content": text}, None, shapes[i].of(entries or [None] * len(ids), ids))
        pending = [first] if first is not None else []
        async for piece in _chain(pending, events):
            logprobs = shapes[piece.index].of(piece.logprobs) if piece.logprobs else None
            if piece.reasoning:
                yield chunk(piece.index, {"reasoning_content": piece.reasoning}, None, logprobs)
                logprobs = None
            if piece.text:
                yield chunk(piece.index, {"content": piece.text}, None, logprobs)
                logprobs = None
            if piece.finish_reason or logprobs:
                yield chunk(piece.index, {}, piece.finish_reason, logprobs)
        if job.body.stream_options and job.body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(job)})
        yield "data: [DONE]\n\n"
    except APIError as e:  # the status is sent already: the error goes in the stream, as OpenAI's does
        yield _sse(error_body(e))
    finally:
        await events.aclose()


async def _chain(first: list, rest: AsyncIterator) -> AsyncIterator:
    for item in first:
        yield item
    async for item in rest:
        yield item
