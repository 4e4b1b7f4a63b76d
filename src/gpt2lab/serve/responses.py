"""OpenAI's response objects for a ``Job``: the whole ``chat.completion`` / ``text_completion`` as JSON, or,
with ``stream: true``, server-sent events of its chunks ending ``data: [DONE]`` (an error after the status is
sent goes in the stream, as OpenAI's does)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from gpt2lab.serve.schemas import APIError, error_body
from gpt2lab.serve.service import Job, Service


def _usage(job: Job) -> dict:
    usage = {"prompt_tokens": len(job.prompt), "completion_tokens": job.completion_tokens}
    usage["total_tokens"] = usage["prompt_tokens"] + job.completion_tokens
    if job.trimmed:
        usage["trimmed_messages"] = job.trimmed  # an extension: oldest messages dropped to fit the context
    return usage


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def respond(service: Service, job: Job, request: Request, chat: bool) -> JSONResponse | StreamingResponse:
    """The whole answer as JSON, or a stream of chunks: OpenAI's chat.completion or text_completion."""
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": ("chat.completion" if chat else "text_completion") + (".chunk" if chat and job.body.stream else ""),
        "created": int(time.time()),
        "model": service.name,
    }
    events = service.generate(job, request)
    if job.body.stream:
        first = await anext_or_none(events)  # errors before the first token (a full queue) are still a 4xx/5xx
        return StreamingResponse(_stream(service, job, head, chat, first, events), media_type="text/event-stream")
    texts, thoughts, reasons = [""] * job.body.n, [""] * job.body.n, [None] * job.body.n
    async for piece in events:
        texts[piece.index] += piece.text
        thoughts[piece.index] += piece.reasoning
        reasons[piece.index] = piece.finish_reason or reasons[piece.index]
    choices = []
    for i, (text, thought, reason) in enumerate(zip(texts, thoughts, reasons)):
        if chat:
            message = {"role": "assistant", "content": text} | ({"reasoning_content": thought} if thought else {})
            choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": None})
        else:
            choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
    return JSONResponse({**head, "choices": choices, "usage": _usage(job)})


async def anext_or_none(events: AsyncIterator):
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


async def _stream(service: Service, job: Job, head: dict, chat: bool, first, events) -> AsyncIterator[str]:
    def chunk(i: int, delta: dict, reason: str | None = None) -> str:
        if chat:
            choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": i, "text": delta.get("content", ""), "finish_reason": reason, "logprobs": None}
        return _sse({**head, "choices": [choice]})

    try:
        if chat:
            for i in range(job.body.n):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None, "logprobs": None}]})  # fmt: skip
        pending = [first] if first is not None else []
        async for piece in _chain(pending, events):
            if piece.reasoning:
                yield chunk(piece.index, {"reasoning_content": piece.reasoning})
            if piece.text:
                yield chunk(piece.index, {"content": piece.text})
            if piece.finish_reason:
                yield chunk(piece.index, {}, piece.finish_reason)
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
