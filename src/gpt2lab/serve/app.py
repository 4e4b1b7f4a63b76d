"""The HTTP app of `gpt2lab serve` (FastAPI): its routes, the request-body limit, the API key, and the handlers that
answer every error as OpenAI's error object; ``serve_in_thread`` runs it in this process (tests, benchmarks).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events with
``stream: true``), ``GET /v1/models`` and ``GET /v1/models/{id}``, ``GET /health`` and the chat page at ``/``
(``static/index.html``).
Bad input is a 4xx, never a traceback: malformed JSON, a wrong field type or range, an unknown role, a prompt or
max_tokens that cannot fit the context, a body over the size limit (413), a full queue (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import Iterator
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.engine import EngineBusy
from gpt2lab.serve.responses import respond
from gpt2lab.serve.schemas import APIError, ChatRequest, CompletionRequest, error_body, validation_message
from gpt2lab.serve.service import Service

log = logging.getLogger(__name__)


def _error(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(error_body(e), status_code=e.status, headers=headers)


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
        # building the job tokenises up to max_total_chars: in a thread, so other streams go on meanwhile
        return await respond(service, await asyncio.to_thread(service.chat_job, body), request, chat=True)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await respond(service, await asyncio.to_thread(service.completion_job, body), request, chat=False)

    def card() -> dict:
        return {"id": service.name, "object": "model", "created": 0, "owned_by": "gpt2lab",
                "context_length": service.block_size}  # fmt: skip

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}", dependencies=auth)  # path: an id may hold a "/" (org/name)
    async def model(model: str):
        service.check_model(model)
        return card()

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
        message, param = validation_message(e, request.headers.get("content-type"))
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
