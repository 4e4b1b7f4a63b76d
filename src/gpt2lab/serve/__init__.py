"""``gpt2lab serve``: an OpenAI-compatible HTTP API and a chat page over the inference engine: the command
(``server.py``), the app and its routes (``app.py``), request bodies and errors (``schemas.py``), a request to engine
sequences (``service.py``) and their text (``reply.py``), OpenAI's responses (``responses.py``), per-request limits
(``limits.py``) and the page (``static/index.html``)."""
