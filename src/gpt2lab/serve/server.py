"""`gpt2lab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and the chat web page.

``serve_command`` checks before it loads anything (``check_binding``: no API key beyond this machine unless told;
``check_port``: the port is free), loads the model and its tokenizer, names it (``served_name``), and runs the
app (``app.create_app``) around one ``Engine`` under uvicorn until Ctrl-C.

The parts: ``schemas`` (request bodies, OpenAI's error object), ``service`` (a request to engine sequences and
back to text), ``reply`` (the text of a reply: stop strings, thinking), ``logprobs`` (OpenAI's two log-prob
shapes), ``responses`` (OpenAI's JSON and server-sent events), ``app`` (routes, limits, error handlers),
``limits`` (what one request may ask for).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.engine import Engine
from gpt2lab.serve.app import create_app
from gpt2lab.serve.limits import ServeLimits
from gpt2lab.serve.service import Service

log = logging.getLogger(__name__)


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
        max_prompts=args.max_prompts, max_body_bytes=args.max_body_bytes,
    )  # fmt: skip
    device = check_device(args.device or default_device())
    tokenizer = model_tokenizer(args.model, args.tokenizer)
    chat_model = is_chat_model(args.model)
    model = load_model(args.model, device, args.dtype)
    if not chat_model:
        log.warning(
            "%s is a base model (not from gpt2lab sft): chats get a plain User:/Assistant: transcript", args.model
        )
    engine = Engine(
        model, max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
        prefix_cache=not args.no_prefix_cache,
    )  # fmt: skip
    name = served_name(args.model, args.served_model_name)
    service = Service(engine, tokenizer, chat_model, limits, name)
    app = create_app(service, api_key, tuple(args.cors_origin))
    print(f"serving {args.model} as {name!r} at http://{args.host}:{args.port} (web page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
