"""What `gpt2lab serve` reads and answers when a request is wrong: the request bodies (pydantic models with
OpenAI's field names and ranges) and OpenAI's error object.

Bad input is answered with ``{"error": {"message", "type", "param", "code"}}`` and a 4xx status, never a
traceback: ``APIError`` carries it, ``error_body`` writes it, ``validation_message`` words what FastAPI's
validation found (malformed JSON, a body that is not JSON, a wrong field type or range).
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


class APIError(Exception):
    """An error answered as OpenAI's error object with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class Message(BaseModel):
    """A chat message: content as a string or as OpenAI's list of parts (text parts only, joined by the service)."""

    model_config = ConfigDict(extra="forbid")
    role: StrictStr
    content: Any  # checked by the service: a string or a list of {"type": "text", "text"} parts
    reasoning_content: StrictStr | None = None  # a past reply's thinking, sent back by clients: not rendered


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against side channels on OpenAI's network: nothing to do


class Sampling(BaseModel):
    """The fields both endpoints take (OpenAI's names and ranges; top_k is an extension).

    Any other field is refused (extra="forbid"): a field a client sends and the server drops would change the
    meaning of the request silently. Fields OpenAI has but this server cannot honour are declared so that
    ``unsupported`` refuses them by name, accepting only their no-op values.
    """

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=0)  # 0: only to score an echoed prompt (completions)
    max_completion_tokens: StrictInt | None = Field(None, gt=0)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)  # 0: no top-k (vLLM's convention); left out: DEFAULT_TOP_K
    n: StrictInt = Field(1, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias in [-100, 100]
    user: StrictStr | None = None  # accepted and ignored: OpenAI's end-user id, for abuse monitoring


class ChatRequest(Sampling):
    messages: list[Message]
    # accepted and ignored: OpenAI documents them as bookkeeping that does not change the generated text
    safety_identifier: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    store: bool | None = None
    # refused unless given their no-op value (see ``unsupported``)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    logprobs: bool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)  # needs logprobs: true
    modalities: list[str] | None = None


class CompletionRequest(Sampling):
    # a text, texts, token ids, or lists of token ids: each prompt gets its own n choices
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # the chosen token's log-prob and the top N (legacy)
    echo: bool | None = None  # the prompt first, in the text and in the log-probs
    # refused unless given their no-op value (see ``unsupported``)
    suffix: str | None = None
    best_of: StrictInt | None = None


def unsupported(body: Sampling) -> APIError | None:
    """A 400 naming the first field this server cannot honour, or None.

    Each field is accepted only with a value that asks for nothing (left out, null, false, or the default
    OpenAI would apply), so a request is either served as asked or refused; never half-served."""
    fields = body.model_fields_set
    noop = {
        "response_format": lambda v: v is None or v == {"type": "text"},
        "tools": lambda v: not v,
        "tool_choice": lambda v: v in (None, "none"),
        "functions": lambda v: not v,
        "function_call": lambda v: v in (None, "none"),
        "top_logprobs": lambda v: v is None or getattr(body, "logprobs", None) is True,
        "modalities": lambda v: v is None or v == ["text"],
        "suffix": lambda v: not v,
        "best_of": lambda v: v is None or v in (1, body.n),
    }
    for name, ok in noop.items():
        if name in fields and not ok(getattr(body, name)):
            return APIError(400, f"{name}: {_why(name)}", param=name, code="unsupported_parameter")
    return None


def _why(name: str) -> str:
    return {
        "response_format": 'this server writes plain text only: only {"type": "text"} is accepted',
        "tools": "this server has no tool calling",
        "tool_choice": 'this server has no tool calling: only "none" is accepted',
        "functions": "this server has no function calling",
        "function_call": 'this server has no function calling: only "none" is accepted',
        "top_logprobs": "top_logprobs needs logprobs: true",
        "modalities": 'this server writes text only: only ["text"] is accepted',
        "suffix": "this server does not complete between a prompt and a suffix (no fill-in-the-middle)",
        "best_of": "this server does not rank several candidates: best_of must equal n (or be 1)",
    }[name]


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def validation_message(e: RequestValidationError, content_type: str | None) -> tuple[str, str | None]:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    if err.get("type") == "extra_forbidden":  # a field the request models do not have (OpenAI's or anyone's)
        return f"unknown field {where}: this server does not support it", where
    if err.get("type") == "json_invalid":
        return f"malformed JSON: {err.get('ctx', {}).get('error', 'cannot parse the body')}", None
    if tuple(err.get("loc", ())) == ("body",):
        if not is_json(content_type):  # FastAPI parses only a JSON Content-Type: the body came as bytes
            return f"send the body as JSON with Content-Type: application/json (got {content_type or 'none'})", None
        return "the request body must be a JSON object", None
    return (f"{where}: {err.get('msg')}" if where else str(err.get("msg"))), where or None


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON: application/json or application/*+json."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
