"""`gpt2lab bench serve`: what continuous batching buys, measured through the real HTTP server.

The server (``gpt2lab.serve.app``, the app `gpt2lab serve` runs) is started in this process on a free
local port; for each client count C, C threads of another process (so the clients' Python never holds
the server's GIL) each send ``--requests`` streaming chat requests one after another (``max_tokens`` new
tokens each, the end token never sampled). Reported per C: aggregate tokens/s
(completion tokens of all requests over the level's wall time), its ratio to one client (measured in the
same run, so a shared machine's load hits all alike), and the time to first token (request sent to first
content chunk received), p50 and p95 over the level's requests.

``--long-request K`` measures instead what one huge request costs the others: K clients stream long replies
from a tiny model, then one chat request as large as the default limits allow (256 messages, 128,000
characters) is sent. Reported: the seconds the server took to build its job (checks, tokenisation, fitting the
history) and to answer it, and the longest gap between consecutive tokens of the K streams before it, while its
job was built, and over the whole request (which includes the engine's prefill of its prompt).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import threading
import time

import torch

from gpt2lab.errors import Gpt2LabError


def _model(spec: str | None, device: str, dtype: str | None):
    """The model served: --model, or a random GPT-2 124M with the chat vocabulary (no download)."""
    from gpt2lab.chat.base import CHAT_VOCAB_SIZE
    from gpt2lab.model.config import GPTConfig
    from gpt2lab.model.gpt import GPT

    if spec:
        from gpt2lab.interop.load import load_model

        return load_model(spec, device, dtype)
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=CHAT_VOCAB_SIZE)).to(device).eval()


SYSTEM = "You are a patient teacher. " * 60  # a long system prompt (~360 tokens) every conversation repeats


def _served_model(args: argparse.Namespace, tiny: bool = False):
    """(model, tokenizer) the benchmark serves: --model, else a random GPT-2 124M (``tiny``: ``_tiny_model``)."""
    from gpt2lab.inference.generate import check_device
    from gpt2lab.interop.tokenizer_match import model_tokenizer
    from gpt2lab.runtime.dist import default_device
    from gpt2lab.tokenizer.bpe import get_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = check_device(args.device or default_device())
    model = _tiny_model(device) if tiny and not args.model else _model(args.model, device, args.dtype)
    return model, model_tokenizer(args.model) if args.model else get_tokenizer()


def _bench_service(model, tokenizer, **engine_options):
    """`gpt2lab serve`'s Service around a new engine; every reply is the model's own tokens up to max_tokens (no end
    token, no calculator)."""
    from gpt2lab.inference.engine import Engine
    from gpt2lab.serve.limits import ServeLimits
    from gpt2lab.serve.service import Service

    service = Service(Engine(model, **engine_options), tokenizer, True, ServeLimits(), "bench")
    service.end_ids, service.calculator = frozenset(), None
    return service


def _client(url: str, requests: int, max_tokens: int, seed: int, record: list, turns: bool = False) -> None:
    """Send streaming chat requests one after another; record (ttft, tokens) of each. ``turns``: the requests
    are the turns of one conversation under ``SYSTEM``, each sending the history with the replies so far."""
    import httpx

    history = [{"role": "system", "content": SYSTEM}] if turns else []
    for r in range(requests):
        history = history if turns else []
        history.append({"role": "user", "content": f"Tell me a story, number {seed}-{r}."})
        body = {
            "messages": history, "max_tokens": max_tokens, "temperature": 1.0, "top_k": 0, "seed": seed * 1000 + r,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        start, first, tokens, reply = time.perf_counter(), None, 0, ""
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                raise Gpt2LabError(f"the server answered {response.status_code}: {response.read().decode()}")
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter() - start
                    reply += chunk["choices"][0]["delta"]["content"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        history.append({"role": "assistant", "content": reply})
        record.append((first if first is not None else time.perf_counter() - start, tokens))


def _tiny_model(device: str):
    """A 2-layer chat-vocabulary model with a 4096-token context: its steps are fast, so gaps show the server."""
    from gpt2lab.chat.base import CHAT_VOCAB_SIZE
    from gpt2lab.model.config import GPTConfig
    from gpt2lab.model.gpt import GPT

    torch.manual_seed(0)
    config = GPTConfig(block_size=4096, vocab_size=CHAT_VOCAB_SIZE, padded_vocab_size=50304, n_layer=2, n_head=2,
                       n_embd=64)  # fmt: skip
    return GPT(config).to(device).eval()


def huge_chat(messages: int = 256, chars: int = 128_000) -> dict:
    """A chat request of ``messages`` messages holding ``chars`` characters of words, ending with a user's."""
    rng = random.Random(0)
    words = ["the", "model", "reads", "a", "long", "history", "of", "turns", "and", "answers", "question", "42."]
    history = []
    for i in range(messages):
        text = ""
        while len(text) < chars // messages:
            text += rng.choice(words) + " "
        history.append(
            {"role": "user" if (messages - 1 - i) % 2 == 0 else "assistant", "content": text[: chars // messages]}
        )
    return {"messages": history, "max_tokens": 1}


def _stream_until(url: str, seed: int, max_tokens: int, stop: threading.Event, times: list) -> None:
    """One streaming chat request read until ``stop`` is set: the arrival time of each content chunk."""
    import httpx

    body = {"messages": [{"role": "user", "content": f"Tell me a story, number {seed}."}], "max_tokens": max_tokens,
            "temperature": 1.0, "top_k": 0, "seed": seed, "stream": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise Gpt2LabError(f"the server answered {response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                times.append(time.perf_counter())
            if stop.is_set():
                return


def _longest_gap(times: list[list[float]], start: float, end: float) -> float:
    """The longest stretch of [start, end] in which a stream got no token (gaps between its tokens, cut to the
    window: a stall is charged to the window it happens in, not to the next one)."""
    return max(
        (min(b, end) - max(a, start) for t in times for a, b in zip(t, t[1:]) if b > start and a < end), default=0.0
    )


def long_prompt(tokens: int) -> dict:
    """A one-message chat request of about ``tokens`` tokens (a word of GPT-2's vocabulary each), answered in 1."""
    words = " ".join(["model"] * (tokens - 8))  # the chat template adds a few
    return {"messages": [{"role": "user", "content": words}], "max_tokens": 1}


def run_long_request(url: str, clients: int, max_tokens: int, body: dict | None = None) -> dict:
    """K streams, then the big request (default ``huge_chat``) once each stream has 20 tokens: when it was sent
    and answered, and when each token of the streams came (time.perf_counter, one clock for all processes on
    Linux)."""
    import httpx

    stop, times = threading.Event(), [[] for _ in range(clients)]
    threads = [
        threading.Thread(target=_stream_until, args=(url, c, max_tokens, stop, times[c])) for c in range(clients)
    ]
    for t in threads:
        t.start()
    while min(len(t) for t in times) < 20 and any(t.is_alive() for t in threads):
        time.sleep(0.01)
    body = body or huge_chat()
    start = time.perf_counter()
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    end = time.perf_counter()
    time.sleep(0.2)  # the first gap after the answer belongs to it too
    stop.set()
    for t in threads:
        t.join()
    if response.status_code != 200:
        raise Gpt2LabError(f"the big request got {response.status_code}: {response.text}")
    if min(t[-1] for t in times) < end:
        raise Gpt2LabError("a stream ended before the big request was answered (the model's context is too short)")
    return {"clients": clients, "start": start, "end": end, "times": times,
            "prompt_tokens": response.json()["usage"]["prompt_tokens"]}  # fmt: skip


def run_level(url: str, clients: int, requests: int, max_tokens: int, turns: bool = False) -> dict:
    record: list = []
    threads = [
        threading.Thread(target=_client, args=(url, requests, max_tokens, c, record, turns)) for c in range(clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if len(record) != clients * requests:
        raise Gpt2LabError(f"{clients * requests - len(record)} requests failed (see the messages above)")
    ttft = sorted(r[0] for r in record)
    tokens = sum(r[1] for r in record)
    return {
        "clients": clients, "requests": len(record), "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttft), "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
    }  # fmt: skip


def bench_serve(args: argparse.Namespace) -> int:
    from gpt2lab.serve.app import create_app, serve_in_thread

    if args.long_prompt is not None and args.long_request is None:
        raise Gpt2LabError("--long-prompt N is the big request of --long-request K: give both")
    if args.turns is not None and args.long_request is not None:
        raise Gpt2LabError("--turns and --long-request are two different benchmarks: give one")
    if args.long_request is not None:
        return bench_long_request(args)
    if min(args.clients) < 1 or args.requests < 1 or args.max_tokens < 1 or (args.turns is not None and args.turns < 1):
        raise Gpt2LabError("--clients, --requests, --max-tokens and --turns must be >= 1")
    if args.turns is not None:
        return bench_turns(args)
    model, tokenizer = _served_model(args)
    service = _bench_service(model, tokenizer, max_batch=args.max_batch, max_queue=max(args.clients) * 2,
                             prefill_chunk=args.prefill_chunk)  # fmt: skip
    engine, device = service.engine, service.engine.device
    print(f"bench serve: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters on {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, max batch {args.max_batch}, "
          f"{args.requests} requests x {args.max_tokens} tokens per client", flush=True)  # fmt: skip
    rows = []
    with serve_in_thread(create_app(service)) as url, multiprocessing.get_context("spawn").Pool(1) as clients_process:
        clients_process.apply(run_level, (url, 1, 1, 4))  # warm-up
        for clients in args.clients:
            engine.peak_running = 0
            row = clients_process.apply(run_level, (url, clients, args.requests, args.max_tokens))
            rows.append({**row, "peak": engine.peak_running})
            print(f"  {clients} clients: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    base = rows[0]["tok_s"] if rows[0]["clients"] == 1 else None
    print("\n| clients | requests | tokens | tok/s | vs 1 client | TTFT p50 | TTFT p95 | peak batch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | {ratio} | "
              f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p95'] * 1000:.0f} ms | {r['peak']} |")  # fmt: skip
    if args.json:
        print(json.dumps(rows))
    return 0


def bench_long_request(args: argparse.Namespace) -> int:
    """``--long-request K``: the longest stall one huge chat request causes K other streams."""
    from gpt2lab.serve.app import create_app, serve_in_thread

    if args.long_request < 1 or (args.long_prompt is not None and args.long_prompt < 16):
        raise Gpt2LabError("--long-request takes the number of streaming clients (>= 1), --long-prompt tokens (>= 16)")
    big = long_prompt(args.long_prompt) if args.long_prompt else None  # else the huge chat
    model, tokenizer = _served_model(args, tiny=big is None)
    service = _bench_service(model, tokenizer, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk)
    engine, device = service.engine, service.engine.device
    prepared, build = [], service.chat_job

    def timed_chat_job(body):  # the big request's job building, timed wherever the app runs it
        start = time.perf_counter()
        job = build(body)
        if len(body.messages) > 1:
            prepared.append((start, time.perf_counter()))
        return job

    service.chat_job = timed_chat_job
    max_tokens = model.config.block_size - 64
    print(f"bench serve --long-request: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.long_request} streams",
          flush=True)  # fmt: skip
    with serve_in_thread(create_app(service)) as url, multiprocessing.get_context("spawn").Pool(1) as clients_process:
        clients_process.apply(run_level, (url, 1, 1, 4))  # warm-up
        row = clients_process.apply(run_long_request, (url, args.long_request, max_tokens, big))
    if big:
        return _report_long_prompt(args, engine, row)
    (built, ready), times, start, end = prepared[-1], row["times"], row["start"], row["end"]
    row = {"clients": row["clients"], "prompt_tokens": row["prompt_tokens"], "build_s": ready - built,
           "answer_s": end - start, "gap_before": _longest_gap(times, min(t[0] for t in times), start),
           "gap_building": _longest_gap(times, built, ready),
           "gap_answering": _longest_gap(times, start, end)}  # fmt: skip
    print(
        "\n| streams | big prompt | job built in | answered in | longest gap: before | while built | while answered |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ms = {k: f"{v * 1000:.0f} ms" for k, v in row.items() if k.endswith("_s") or k.startswith("gap")}
    print(f"| {row['clients']} | {row['prompt_tokens']} tokens | {ms['build_s']} | {ms['answer_s']} | "
          f"{ms['gap_before']} | {ms['gap_building']} | {ms['gap_answering']} |")  # fmt: skip
    if args.json:
        print(json.dumps(row))
    return 0


def _chunk_seconds(engine, tokens: int) -> float:
    """The engine's time for one prefill forward of ``tokens`` prompt tokens (the best of 3)."""
    from gpt2lab.inference.engine import Sequence

    best = float("inf")
    engine.prefix_cache, engine.cached = False, {}  # each run prefills the whole chunk
    tokens = min(tokens, engine.block_size - 1)  # a prompt leaves room for its token
    for _ in range(3):
        seq = Sequence(list(range(100, 100 + tokens)), 1, lambda token, reason: None, temperature=0)
        engine.prefill_chunk, start = tokens, time.perf_counter()
        engine.run([seq])  # one prefill forward, and the token from its logits
        best = min(best, time.perf_counter() - start)
    return best


def _report_long_prompt(args: argparse.Namespace, engine, row: dict) -> int:
    """``--long-prompt N``: how long the streams waited while the N-token prompt was prefilled, against one
    decoding step (their median gap before) and one prefill chunk (measured after, the server stopped)."""
    times, start, end = row["times"], row["start"], row["end"]
    before = sorted(b - a for t in times for a, b in zip(t, t[1:]) if b < start)
    step = before[len(before) // 2]
    chunk = _chunk_seconds(engine, args.prefill_chunk)
    out = {"clients": row["clients"], "prompt_tokens": row["prompt_tokens"], "prefill_chunk": args.prefill_chunk,
           "answer_s": end - start, "step_s": step, "chunk_s": chunk,
           "gap_answering": _longest_gap(times, start, end)}  # fmt: skip
    print("\n| streams | prompt | chunk | answered in | a step (median gap before) | one chunk's prefill | "
          "longest gap while answered |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ms = {k: f"{out[k] * 1000:.0f} ms" for k in ("answer_s", "step_s", "chunk_s", "gap_answering")}
    print(f"| {out['clients']} | {out['prompt_tokens']} tokens | {args.prefill_chunk} | {ms['answer_s']} | "
          f"{ms['step_s']} | {ms['chunk_s']} | {ms['gap_answering']} |")  # fmt: skip
    if args.json:
        print(json.dumps(out))
    return 0


def bench_turns(args: argparse.Namespace) -> int:
    """``--turns T``: C clients each hold a T-turn conversation under a long system prompt, served with the
    engine's prefix cache and without, one after the other on fresh servers: what the cache buys."""
    from gpt2lab.serve.app import create_app, serve_in_thread

    model, tokenizer = _served_model(args)
    clients = max(args.clients)
    print(f"bench serve --turns {args.turns}: {clients} conversations of {args.turns} turns x {args.max_tokens} "
          f"tokens, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    rows = []
    for cache in (True, False):
        service = _bench_service(
            model, tokenizer, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, prefix_cache=cache
        )
        engine = service.engine
        with serve_in_thread(create_app(service)) as url, multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(run_level, (url, 1, 1, 4))  # warm-up
            before = engine.prompt_tokens, engine.cached_tokens
            row = pool.apply(run_level, (url, clients, args.turns, args.max_tokens, True))
        row |= {"prefix_cache": cache, "prefilled": engine.prompt_tokens - before[0],
                "cached": engine.cached_tokens - before[1]}  # fmt: skip
        rows.append(row)
    print("\n| prefix cache | conversations x turns | prompt tokens prefilled | found in the cache | tok/s | "
          "TTFT p50 | TTFT p95 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ttft = f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p95'] * 1000:.0f} ms"
        print(f"| {'on' if r['prefix_cache'] else 'off'} | {clients} x {args.turns} | {r['prefilled']:,} | "
              f"{r['cached']:,} | {r['tok_s']:.1f} | {ttft} |")  # fmt: skip
    if args.json:
        print(json.dumps(rows))
    return 0
