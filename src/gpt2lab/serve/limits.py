"""The limits of `gpt2lab serve`: what one request may ask for (a light module: the CLI reads the defaults
without importing FastAPI)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeLimits:
    """What one request may ask for (each a `gpt2lab serve` flag)."""

    max_messages: int = 256
    max_message_chars: int = 32_000
    max_total_chars: int = 128_000
    max_tokens: int | None = None  # most new tokens per request; None = up to the context
    default_max_tokens: int = 256  # when the request gives no max_tokens (never more than the context left)
    max_top_k: int = 1000
    max_n: int = 4
    max_prompts: int = 32  # prompts in one /v1/completions request (each gets its own n choices)
    max_body_bytes: int = 1_000_000
