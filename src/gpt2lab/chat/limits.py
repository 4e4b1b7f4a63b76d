"""The limits of `gpt2lab serve` and the sampling defaults it shares with `gpt2lab chat` (a light module: the
CLI reads the defaults without importing FastAPI)."""

from __future__ import annotations

from dataclasses import dataclass

# How a reply is sampled when the request (or `gpt2lab chat`'s flags) leave it out: one definition, so the
# terminal, the API and the web page sample a model alike. A small model sampled from its whole distribution at
# temperature 1 strays into the long tail: its replies read far worse than at 0.7 with top-k 50.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 50


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
    max_body_bytes: int = 1_000_000
