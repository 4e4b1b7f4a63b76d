"""`gpt2lab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and the chat web page.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events with
``stream: true``, ending ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and the page at ``/``.
Every request becomes ``n`` ``engine.Sequence``s decoded by the one ``Engine`` with everyone else's
(continuous batching); the handler turns their tokens into text (whole UTF-8 characters, cut before a
``stop`` string) and into OpenAI's response or chunk objects. A request that leaves ``temperature`` or ``top_k``
out is sampled as ``gpt2lab chat`` samples (``chat.defaults``).

Bad input is answered with OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` and a
4xx status, never a traceback: malformed JSON, a wrong field type or range, an unknown role, a prompt or
max_tokens that cannot fit the context, a body over the size limit, a full queue (503). A history longer
than the context loses its oldest turns first, as in ``gpt2lab chat`` (``usage.trimmed_messages`` counts
them). A client that disconnects cancels its sequences: the engine stops decoding them at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from gpt2lab.chat.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from gpt2lab.chat.template import PLAIN_STOP, check_conversation, fit_history, render_plain_prompt, render_prompt
from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.engine import Engine, EngineBusy, Sequence
from gpt2lab.inference.generate import TextStream
from gpt2lab.serve.limits import ServeLimits
from gpt2lab.tokenizer.bpe import SPECIAL_TOKENS

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- requests


class APIError(Exception):
    """An error answered as OpenAI's error object with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: StrictStr


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The sampling fields both endpoints take (OpenAI's names and ranges; top_k is an extension)."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields a small server can ignore
    model: str | None = None
    max_tokens: StrictInt | None = Field(None, gt=0)
    max_completion_tokens: StrictInt | None = Field(None, gt=0)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)  # 0: no top-k (vLLM's convention); left out: DEFAULT_TOP_K
    n: StrictInt = Field(1, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampling):
    messages: list[Message]


class CompletionRequest(Sampling):
    prompt: StrictStr


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


# ----------------------------------------------------------------------------- the service


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


class StopText:
    """A choice's text as tokens arrive: whole UTF-8 characters, cut before the first stop string.

    Text that could be the start of a stop string is held back until the next token tells.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.stream, self.stops, self.held, self.text = TextStream(tokenizer, eos_id=None), stops, "", ""

    def push(self, token: int) -> tuple[str, bool]:
        """(text released, whether a stop string was reached)."""
        return self._release(self.stream.push(token), final=False)

    def flush(self) -> str:
        return self._release(self.stream.flush(), final=True)[0]

    def _release(self, piece: str, final: bool) -> tuple[str, bool]:
        text = self.held + piece
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            out, stopped, self.held = text[: min(hits)], True, ""
        else:
            hold = (
                0
                if final
                else max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            )
            out, stopped, self.held = text[: len(text) - hold], False, text[len(text) - hold :]
        self.text += out
        return out, stopped


@dataclass
class Piece:
    """Text of one choice that became ready: answer text, thinking text, and the finish_reason at its end."""

    index: int
    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None


class ReplyText:
    """A chat reply as tokens arrive: the answer (cut before a stop string) and, apart, its thinking.

    With ``think_ids`` (<think>, </think>), tokens between them are reasoning, OpenAI-compatible servers'
    ``reasoning_content``; without, a thinking token's string is plain text (the completions endpoint).
    """

    def __init__(self, tokenizer, stops: tuple[str, ...], think_ids: tuple[int, int] | None):
        self.answer, self.reasoning = StopText(tokenizer, stops), StopText(tokenizer, ())
        self.think_ids, self.thinking = think_ids, False

    def push(self, token: int) -> Piece:
        if self.think_ids and token in self.think_ids:
            self.thinking = token == self.think_ids[0]
            return Piece(0, reasoning="" if self.thinking else self.reasoning.flush())
        if self.thinking:
            return Piece(0, reasoning=self.reasoning.push(token)[0])
        text, stopped = self.answer.push(token)
        return Piece(0, text, finish_reason="stop" if stopped else None)

    def flush(self, reason: str) -> Piece:
        return Piece(0, self.answer.flush(), self.reasoning.flush(), reason)


# ----------------------------------------------------------------------------- responses


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
        yield _sse(_error_body(e))
    finally:
        await events.aclose()


async def _chain(first: list, rest: AsyncIterator) -> AsyncIterator:
    for item in first:
        yield item
    async for item in rest:
        yield item


# ----------------------------------------------------------------------------- the app


def _error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _error(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(_error_body(e), status_code=e.status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over max_bytes is refused (413) as soon as it passes the limit.

    The body (at most max_bytes) is read here, then handed to the app: a chunked upload without a
    Content-Length is counted as it arrives, never read in full.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _error(_too_large(self.max_bytes))(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _error(_too_large(self.max_bytes))(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is over {max_bytes} bytes", code="request_too_large")


def _validation_message(e: RequestValidationError, content_type: str | None) -> tuple[str, str | None]:
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return f"malformed JSON: {err.get('ctx', {}).get('error', 'cannot parse the body')}", None
    if tuple(err.get("loc", ())) == ("body",):
        if not _is_json(content_type):  # FastAPI parses only a JSON Content-Type: the body came as bytes
            return f"send the body as JSON with Content-Type: application/json (got {content_type or 'none'})", None
        return "the request body must be a JSON object", None
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    return (f"{where}: {err.get('msg')}" if where else str(err.get("msg"))), where or None


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON: application/json or application/*+json."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def create_app(
    service: Service, api_key: str | None = None, cors_origins: tuple[str, ...] = (), start_engine: bool = True
) -> FastAPI:
    """The FastAPI app serving ``service``; with ``api_key``, /v1 routes need ``Authorization: Bearer KEY``."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            service.engine.start()
        yield
        if start_engine:
            service.engine.stop()

    app = FastAPI(title="gpt2lab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])
    _add_error_handlers(app, service)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):  # constant time: no timing oracle
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    auth = [Depends(authorized)]

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request):
        return await respond(service, service.chat_job(body), request, chat=True)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await respond(service, service.completion_job(body), request, chat=False)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        card = {"id": service.name, "object": "model", "created": 0, "owned_by": "gpt2lab"}
        return {"object": "list", "data": [{**card, "context_length": service.block_size}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, **service.engine.load()}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (resources.files("gpt2lab.serve") / "static" / "index.html").read_text(encoding="utf-8")

    return app


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        message, param = _validation_message(e, request.headers.get("content-type"))
        return _error(APIError(400, message, param=param))

    @app.exception_handler(EngineBusy)
    async def busy(request, e: EngineBusy):
        return _error(APIError(503, str(e), type="server_busy", code="queue_full"))

    @app.exception_handler(Gpt2LabError)
    async def bad_input(request, e: Gpt2LabError):
        return _error(APIError(400, str(e)))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return _error(APIError(e.status_code, str(e.detail), type="not_found" if e.status_code == 404 else "error"))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("internal error")
        return _error(APIError(500, "internal server error", type="server_error"))


# ----------------------------------------------------------------------------- the command


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a background thread until the block ends; yields its base URL (port 0: a free one)."""
    import socket

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, name="gpt2lab-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise Gpt2LabError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def check_binding(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve beyond this machine without an API key, unless explicitly told to."""
    if host == "localhost" or api_key or insecure_no_auth:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Gpt2LabError(
            f"--host {host} serves beyond this machine: give --api-key KEY (or GPT2LAB_API_KEY), "
            "or --insecure-no-auth to serve without one"
        )


def check_port(host: str, port: int) -> None:
    """Fail at once, before the model loads, when host:port is taken: bind it as uvicorn will, then let it go
    (uvicorn would find out only after the load, and exit with its own log lines)."""
    import errno
    import socket

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Gpt2LabError(f"--host {host}: cannot resolve it ({e.strerror})") from e
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
                s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise Gpt2LabError(f"{where} is already in use (another server?): pick a free port with --port") from e
            if e.errno == errno.EACCES:
                raise Gpt2LabError(f"{where}: permission denied (a port below 1024?): pick another with --port") from e
            # anything else (an address family this machine lacks): uvicorn binds what it can


def served_name(model: str, given: str | None = None) -> str:
    """The model id in /v1/models and responses: ``given`` (--served-model-name), else the run's name as its
    folder says (runs/shakespeare: shakespeare; a checkpoint in runs/chat/checkpoints: chat; gpt2: gpt2)."""
    if given:
        return given
    path = Path(os.path.abspath(os.path.expanduser(model)))  # "." and "runs/chat/" have a name too
    if path.parent.name == "checkpoints":  # a checkpoint of a run: the page names the run
        path = path.parent.parent
    return path.name or model


def serve_command(args) -> int:
    """`gpt2lab serve --model RUN`: load the model, start the engine, serve until Ctrl-C."""
    import uvicorn

    from gpt2lab.chat.base import is_chat_model
    from gpt2lab.inference.generate import check_device
    from gpt2lab.interop.load import load_model
    from gpt2lab.interop.tokenizer_match import model_tokenizer
    from gpt2lab.runtime.dist import default_device

    api_key = args.api_key or os.environ.get("GPT2LAB_API_KEY") or None
    check_binding(args.host, api_key, args.insecure_no_auth)
    check_port(args.host, args.port)  # before the model loads: a busy port is one line, not a wait and a log
    limits = ServeLimits(
        max_messages=args.max_messages, max_message_chars=args.max_message_chars,
        max_total_chars=args.max_total_chars, max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens, max_top_k=args.max_top_k, max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
    )  # fmt: skip
    device = check_device(args.device or default_device())
    tokenizer = model_tokenizer(args.model, args.tokenizer)
    chat_model = is_chat_model(args.model)
    model = load_model(args.model, device, args.dtype)
    if not chat_model:
        log.warning(
            "%s is a base model (not from gpt2lab sft): chats get a plain User:/Assistant: transcript", args.model
        )
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue)
    name = served_name(args.model, args.served_model_name)
    service = Service(engine, tokenizer, chat_model, limits, name)
    app = create_app(service, api_key, tuple(args.cors_origin))
    print(f"serving {args.model} as {name!r} at http://{args.host}:{args.port} (web page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
