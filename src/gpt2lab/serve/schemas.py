"""What `gpt2lab serve` reads and answers when a request is wrong: the request bodies (pydantic models with
OpenAI's field names and ranges) and OpenAI's error object.

Bad input is answered with ``{"error": {"message", "type", "param", "code"}}`` and a 4xx status, never a
traceback: ``APIError`` carries it, ``error_body`` writes it, ``validation_message`` words what FastAPI's
validation found (malformed JSON, a body that is not JSON, a wrong field type or range).
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


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


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def validation_message(e: RequestValidationError, content_type: str | None) -> tuple[str, str | None]:
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return f"malformed JSON: {err.get('ctx', {}).get('error', 'cannot parse the body')}", None
    if tuple(err.get("loc", ())) == ("body",):
        if not is_json(content_type):  # FastAPI parses only a JSON Content-Type: the body came as bytes
            return f"send the body as JSON with Content-Type: application/json (got {content_type or 'none'})", None
        return "the request body must be a JSON object", None
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    return (f"{where}: {err.get('msg')}" if where else str(err.get("msg"))), where or None


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON: application/json or application/*+json."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
