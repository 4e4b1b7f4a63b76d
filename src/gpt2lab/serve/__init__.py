"""``gpt2lab serve``: an OpenAI-compatible HTTP API and a chat page (``server.py``, ``static/index.html``) over the
inference engine, with per-request limits (``limits.py``)."""
