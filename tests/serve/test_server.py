"""`gpt2lab serve`: the OpenAI API through the official `openai` package and plain httpx, its errors, limits,
authentication, disconnects, and continuous batching under 32 concurrent clients."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from gpt2lab.chat.template import render_plain_prompt, render_prompt
from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.engine import Engine, Sequence
from gpt2lab.inference.generate import generate_ids
from gpt2lab.model.config import GPTConfig
from gpt2lab.serve.limits import ServeLimits
from gpt2lab.serve.reply import StopText
from gpt2lab.serve.server import check_binding
from tests.serve.conftest import serving, tiny_chat_model

BLOCK = 64


@pytest.fixture(scope="module")
def model():
    return tiny_chat_model(BLOCK)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with serving(model, tokenizer, ServeLimits(max_n=3, max_top_k=100), max_batch=8, max_queue=64) as served:
        yield served


def expected(model, tokenizer, prompt_ids, max_new, **sampling) -> str:
    """The reply of the request run alone through gpt2lab.inference.generate: its tokens up to the first special one."""
    out = generate_ids(model, prompt_ids, max_new_tokens=max_new, eos_id=None, **sampling)[0]
    cut = next((i for i, t in enumerate(out) if t >= tokenizer.eot), len(out))
    return tokenizer.decode(out[:cut])


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- the OpenAI API


def test_the_openai_package_gets_the_reply_generate_gives_streamed_or_not(server, model, tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, *user("What is a bird?")]
    want = expected(model, tokenizer, render_prompt(messages, tokenizer), 12, temperature=0)
    reply = client.chat.completions.create(model="gpt2lab", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == want and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(render_prompt(messages, tokenizer))
    assert reply.usage.completion_tokens == 12 and reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert reply.model == "gpt2lab" and reply.object == "chat.completion"

    chunks = list(
        client.chat.completions.create(
            model="gpt2lab", messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == want  # streamed in several pieces, the same text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    models = client.models.list()
    assert [m.id for m in models.data] == ["gpt2lab"]


def test_seeded_sampling_and_n_choices_match_generate_alone(server, model, tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    ids = tokenizer.encode_ordinary("Once upon a time")
    done = client.completions.create(
        model="gpt2lab",
        prompt="Once upon a time",
        max_tokens=10,
        n=2,
        seed=7,
        temperature=0.9,
        top_p=0.95,
        extra_body={"top_k": 40},  # top_k is an extension: the openai package passes it through extra_body
    )
    for i, choice in enumerate(sorted(done.choices, key=lambda c: c.index)):  # choice i samples with seed + i
        assert choice.text == expected(model, tokenizer, ids, 10, temperature=0.9, top_k=40, top_p=0.95, seed=7 + i)
    assert done.choices[0].text != done.choices[1].text
    assert done.usage.completion_tokens == 20 and done.object == "text_completion"


def test_plain_httpx_stream_is_server_sent_events_ending_with_done(server, model, tokenizer):
    body = {"messages": user("hello"), "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected(model, tokenizer, render_prompt(user("hello"), tokenizer), 6, temperature=0)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["generated_tokens"] > 0


def test_a_stop_string_cuts_the_reply_before_it(server, model, tokenizer):
    ids = tokenizer.encode_ordinary("The sea")
    full = expected(model, tokenizer, ids, 20, temperature=1.0, seed=3)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    sampling = {"temperature": 1.0, "top_k": 0, "seed": 3}  # top_k 0: no top-k, as `expected` samples
    body = {"prompt": "The sea", "max_tokens": 20, **sampling, "stop": [stop, "\x00never"]}
    choice = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


def test_stop_text_holds_back_a_possible_stop_and_never_splits_a_character(tokenizer):
    text = StopText(tokenizer, ("\nUser:",))
    released = []
    for token in tokenizer.encode_ordinary("ab\nUser: more"):
        released.append(text.push(token))
        if released[-1][1]:
            break
    assert [stopped for _, stopped in released] == [False] * (len(released) - 1) + [True]
    assert "".join(piece for piece, _ in released) == text.text == "ab"
    assert released[1][0] == "" or released[0][0] == "ab"  # "\n" is held back: it may open the stop string
    emoji = StopText(tokenizer, ())
    out = [emoji.push(t)[0] for t in tokenizer.encode_ordinary("😀")]
    assert out[-1] == "😀" and all(o == "" for o in out[:-1])  # held back until the character is whole


def test_a_long_history_loses_its_oldest_turns_and_usage_says_so(server, tokenizer):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 4}, {"role": "assistant", "content": "answer " * 4}]
    messages = [{"role": "system", "content": "sys"}, *turns, *user("last one")]
    assert len(render_prompt(messages, tokenizer)) > BLOCK - 8
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 8}, timeout=60)
    usage = r.json()["usage"]
    assert r.status_code == 200 and usage["trimmed_messages"] > 0 and usage["prompt_tokens"] <= BLOCK - 8
    kept = [messages[0], *messages[1 + usage["trimmed_messages"] :]]
    assert usage["prompt_tokens"] == len(render_prompt(kept, tokenizer))  # the system message stays


# ----------------------------------------------------------------------------- bad requests


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **kwargs)


BAD = {
    "malformed JSON": (
        "/v1/chat/completions",
        {"content": b'{"messages": [', "headers": {"content-type": "application/json"}},
        "malformed JSON",
    ),  # noqa: E501
    "not an object": ("/v1/chat/completions", {"json": [1, 2]}, "JSON object"),
    "unknown role": ("/v1/chat/completions", {"json": {"messages": [{"role": "bot", "content": "x"}]}}, "unknown role"),
    "empty messages": ("/v1/chat/completions", {"json": {"messages": []}}, "non-empty"),
    "no messages": ("/v1/chat/completions", {"json": {"max_tokens": 3}}, "messages"),
    "non-string content": ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": 3}]}}, "string"),
    "two system messages": (
        "/v1/chat/completions",
        {"json": {"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, *user("x")]}},
        "second system",
    ),  # noqa: E501
    "ends with the assistant": (
        "/v1/chat/completions",
        {"json": {"messages": [*user("x"), {"role": "assistant", "content": "y"}]}},
        "end with a user",
    ),  # noqa: E501
    "temperature < 0": ("/v1/chat/completions", {"json": {"messages": user("x"), "temperature": -0.1}}, "temperature"),
    "temperature > 2": ("/v1/chat/completions", {"json": {"messages": user("x"), "temperature": 2.5}}, "temperature"),
    "top_p 0": ("/v1/chat/completions", {"json": {"messages": user("x"), "top_p": 0}}, "top_p"),
    "top_p > 1": ("/v1/chat/completions", {"json": {"messages": user("x"), "top_p": 1.5}}, "top_p"),
    "max_tokens 0": ("/v1/chat/completions", {"json": {"messages": user("x"), "max_tokens": 0}}, "max_tokens"),
    "max_tokens past the context": (
        "/v1/chat/completions",
        {"json": {"messages": user("x"), "max_tokens": BLOCK}},
        "context",
    ),  # noqa: E501
    "prompt longer than the context": (
        "/v1/chat/completions",
        {"json": {"messages": user("word " * 200)}},
        "does not fit",
    ),  # noqa: E501
    "completion prompt too long": ("/v1/completions", {"json": {"prompt": "word " * 200}}, "does not fit"),
    "n too large": ("/v1/chat/completions", {"json": {"messages": user("x"), "n": 4}}, "limit of 3"),
    "n 0": ("/v1/chat/completions", {"json": {"messages": user("x"), "n": 0}}, "n"),
    "top_k too large": ("/v1/chat/completions", {"json": {"messages": user("x"), "top_k": 101}}, "top_k"),
    "top_k a string": ("/v1/chat/completions", {"json": {"messages": user("x"), "top_k": "ten"}}, "top_k"),
    "five stops": ("/v1/completions", {"json": {"prompt": "x", "stop": list("abcde")}}, "stop"),
    "a message too long": ("/v1/chat/completions", {"json": {"messages": user("x" * 32_001)}}, "characters"),
    "too many messages": ("/v1/chat/completions", {"json": {"messages": user("x") * 257}}, "limit is 256"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_a_400_with_an_openai_error_object(server, case):
    path, kwargs, words = BAD[case]
    r = _post(server, path, **kwargs)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"], error["message"]


def test_unknown_routes_and_oversized_bodies_get_openai_errors(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]
    big = _post(server, "/v1/chat/completions", content=b"x" * 1_000_001, headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    def chunked():  # no content-length: the limit is counted as the body arrives
        for _ in range(12):
            yield b"x" * 100_000

    streamed = _post(server, "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_a_full_queue_answers_503_at_once(model, tokenizer):
    with serving(model, tokenizer, max_batch=1, max_queue=0, step_delay=0.05) as busy:
        body = {"messages": user("x"), "max_tokens": 40, "stream": True}
        with httpx.stream("POST", busy.url + "/v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)  # decoding: the one slot is taken
            start = time.monotonic()
            second = _post(busy, "/v1/chat/completions", json={"messages": user("y"), "max_tokens": 2})
            assert second.status_code == 503 and time.monotonic() - start < 5
            assert second.json()["error"]["code"] == "queue_full" and second.headers["retry-after"] == "1"


# ----------------------------------------------------------------------------- safety


def test_an_api_key_is_checked_on_the_api(model, tokenizer):
    with serving(model, tokenizer, api_key="s3cret") as locked:
        body = {"messages": user("x"), "max_tokens": 2}
        assert _post(locked, "/v1/chat/completions", json=body).status_code == 401
        wrong = _post(locked, "/v1/chat/completions", json=body, headers={"authorization": "Bearer s3cre"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = _post(locked, "/v1/chat/completions", json=body, headers={"authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert httpx.get(locked.url + "/v1/models").status_code == 401
        assert httpx.get(locked.url + "/health").status_code == 200


def test_serving_beyond_this_machine_needs_a_key_or_an_explicit_opt_out(capsys):
    check_binding("127.0.0.1", None, False)
    check_binding("::1", None, False)
    check_binding("0.0.0.0", "key", False)
    check_binding("0.0.0.0", None, True)
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(Gpt2LabError, match="--api-key"):
            check_binding(host, None, False)
    from gpt2lab.cli.main import main

    assert main(["serve", "--model", "nowhere", "--host", "0.0.0.0"]) == 2  # refused before loading anything
    assert "--insecure-no-auth" in capsys.readouterr().err


def test_a_client_that_disconnects_stops_its_generation(model, tokenizer):
    with serving(model, tokenizer, step_delay=0.02) as slow:
        body = {"messages": user("go"), "max_tokens": 50, "stream": True}
        with httpx.stream("POST", slow.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        # the connection is closed: within a moment the engine drops the sequence and the counter stops
        deadline = time.monotonic() + 10
        while slow.engine.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        count = slow.engine.generated_tokens
        time.sleep(0.5)
        assert slow.engine.load()["running"] == 0 and slow.engine.generated_tokens == count
        assert count < 30  # far from the 50 it was asked for (one token per 20 ms)


# ----------------------------------------------------------------------------- continuous batching


def test_32_concurrent_clients_each_get_their_own_reply(server, model, tokenizer):
    """Greedy and seeded requests streamed together equal each request run alone; the engine decoded them in
    batches (its peak batch is > 1) with its fixed cache (memory does not grow with the clients)."""

    def request(i: int) -> dict:
        sampling = {"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": i, "top_k": 50}
        return {"messages": user(f"client {i} says " + "hi " * (i % 5)), "max_tokens": 8 + i % 7, **sampling}

    def run(i: int) -> str:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**request(i), "stream": True},
                          timeout=120) as r:  # fmt: skip
            assert r.status_code == 200
            data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in data)

    cache_bytes = server.engine.cache.k.numel() * 2
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(run, range(32)))
    for i, reply in enumerate(replies):
        r = request(i)
        sampling = {k: r[k] for k in ("temperature", "seed", "top_k") if k in r}
        assert reply == expected(model, tokenizer, render_prompt(r["messages"], tokenizer), r["max_tokens"], **sampling)
    assert len(set(replies)) > 16  # the replies differ: a mix-up between clients could not go unseen
    load = server.engine.load()
    assert load["peak_running"] > 1 and load["running"] == load["waiting"] == 0
    assert server.engine.cache.k.numel() * 2 == cache_bytes


def test_the_engine_finishes_a_sequence_at_the_end_token_and_at_the_context(model, tokenizer):
    end = tokenizer.special_id("<|assistant_end|>")
    events: list = []
    engine = Engine(model, max_batch=2).start()
    try:
        prompt = render_prompt(user("x"), tokenizer)
        first = generate_ids(model, prompt, max_new_tokens=1, temperature=0)[0][0]
        done = threading.Event()

        def emit(token, reason):
            events.append((token, reason))
            if reason:
                done.set()

        engine.submit([Sequence(prompt, 5, emit, temperature=0, end_ids=frozenset({first}))])
        assert done.wait(30) and events == [(None, "stop")]  # the first token was an end token: nothing emitted
        events.clear(), done.clear()
        long_prompt = [tokenizer.eot] * (BLOCK - 3)
        engine.submit([Sequence(long_prompt, 100, emit, temperature=0, end_ids=frozenset({end}))])
        assert done.wait(30) and events[-1] == (None, "length") and len(events) - 1 == 3  # prompt + reply = the context
    finally:
        engine.stop()


def test_a_base_model_is_served_a_plain_transcript_that_stops_at_the_next_user_turn(tokenizer):
    from gpt2lab.model.gpt import GPT

    torch.manual_seed(1)
    base = GPT(GPTConfig(block_size=BLOCK, vocab_size=50257, padded_vocab_size=50304, n_layer=2, n_head=2,
                         n_embd=32)).eval()  # fmt: skip
    with serving(base, tokenizer, chat_model=False) as served:
        body = {"messages": user("hello"), "max_tokens": 10, "temperature": 0}
        reply = _post(served, "/v1/chat/completions", json=body).json()
        assert reply["usage"]["prompt_tokens"] == len(render_plain_prompt(user("hello"), tokenizer))
        want = expected(base, tokenizer, render_plain_prompt(user("hello"), tokenizer), 10, temperature=0)
        assert reply["choices"][0]["message"]["content"] == want.split("\nUser:")[0]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_the_serve_command_serves_a_run_folder(tmp_path, tokenizer):
    """`gpt2lab serve --model RUN` as a user starts it: it answers the API and the page, and stops on SIGINT."""
    import signal
    import subprocess

    from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, save_model
    from tests.conftest import REPO, free_port

    save_model(tiny_chat_model(BLOCK), tmp_path / "chat", extra={TRAIN_STATE_KEY: {"config": {"sft": {"data": "x"}}}})
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "gpt2lab", "serve", "--model", str(tmp_path / "chat"), "--port", str(port),
            "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        body = {"messages": user("hi"), "max_tokens": 4, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] <= 4 and reply["choices"][0]["finish_reason"] in ("stop", "length")
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "chat"  # the run's name
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in out


def test_a_thinking_span_is_reasoning_content_apart_from_the_answer(tokenizer):
    from gpt2lab.serve.reply import ReplyText

    think, end_think = tokenizer.special_id("<think>"), tokenizer.special_id("</think>")
    ids = [think, *tokenizer.encode_ordinary("7 + 5 = 12"), end_think, *tokenizer.encode_ordinary("12 User: x")]
    reply = ReplyText(tokenizer, (" User:",), (think, end_think))
    pieces = [reply.push(t) for t in ids]
    stopped = next(i for i, p in enumerate(pieces) if p.finish_reason)
    last = reply.flush("stop")
    assert "".join(p.reasoning for p in pieces) + last.reasoning == "7 + 5 = 12"
    assert "".join(p.text for p in pieces[: stopped + 1]) == "12" and pieces[stopped].finish_reason == "stop"
    plain = ReplyText(tokenizer, (), None)  # the completions endpoint: thinking tokens are text
    assert "".join(plain.push(t).text for t in ids[:3]) + plain.flush("stop").text == "<think>7 +"


# ----------------------------------------------------------------------------- a new user's first run


def _save_run(path) -> None:
    """A tiny chat model saved as `gpt2lab sft` leaves a run folder."""
    from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, save_model

    save_model(tiny_chat_model(BLOCK), path, extra={TRAIN_STATE_KEY: {"config": {"sft": {"data": "x"}}}})


def test_a_busy_port_is_one_error_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import socket

    import gpt2lab.interop.load
    from gpt2lab.cli.main import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    _save_run(tmp_path / "chat")
    monkeypatch.setattr(gpt2lab.interop.load, "load_model", no_load)
    with socket.socket() as taken:  # another server on the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--model", str(tmp_path / "chat"), "--port", str(port), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and "serving" not in out, out
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert f"127.0.0.1:{port} is already in use" in err and "--port" in err, err


def test_a_request_without_temperature_or_top_k_samples_as_gpt2lab_chat(server, monkeypatch):
    from gpt2lab.chat.terminal import Sampling as ChatSampling

    seen: list[Sequence] = []
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda seqs: (seen.extend(seqs), submit(seqs))[1])
    for path, body in (("/v1/chat/completions", {"messages": user("hi")}), ("/v1/completions", {"prompt": "hi"})):
        assert _post(server, path, json={**body, "max_tokens": 2}).status_code == 200
    chat = ChatSampling()
    assert [(s.temperature, s.top_k) for s in seen] == [(chat.temperature, chat.top_k)] * 2
    from gpt2lab.chat.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_K  # the one definition both use

    assert (chat.temperature, chat.top_k) == (DEFAULT_TEMPERATURE, DEFAULT_TOP_K) == (0.7, 50)
    seen.clear()  # top_k 0 turns top-k off (vLLM's convention): the whole distribution stays reachable
    body = {"messages": user("hi"), "max_tokens": 2, "temperature": 1, "top_k": 0}
    assert _post(server, "/v1/chat/completions", json=body).status_code == 200
    assert [(s.temperature, s.top_k) for s in seen] == [(1, None)]


def test_max_tokens_that_leave_no_room_for_the_prompt_are_blamed_on_max_tokens(server, tokenizer):
    text = "hello there, how are you"
    cases = (
        ("/v1/chat/completions", {"messages": user(text)}, len(render_prompt(user(text), tokenizer))),
        ("/v1/completions", {"prompt": text}, len(tokenizer.encode_ordinary(text))),
    )
    for path, body, prompt_tokens in cases:
        r = _post(server, path, json={**body, "max_tokens": BLOCK - 2})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "max_tokens", error
        assert f"the prompt takes {prompt_tokens} tokens" in error["message"], error["message"]
        assert f"the model's context is {BLOCK}" in error["message"], error["message"]
        assert f"at most {BLOCK - prompt_tokens}" in error["message"], error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", None])
def test_a_json_body_without_the_json_content_type_names_the_content_type(server, content_type):
    body = json.dumps({"messages": user("hi"), "max_tokens": 2}).encode()
    headers = {"content-type": content_type} if content_type else {}
    r = _post(server, "/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "Content-Type: application/json" in message and f"(got {content_type or 'none'})" in message, message


@pytest.mark.parametrize(
    "spec, given, name",
    [
        ("runs/shakespeare", None, "shakespeare"),
        ("runs/shakespeare/", None, "shakespeare"),
        ("runs/chat/checkpoints/step_0000200", None, "chat"),  # a checkpoint of a run: the run's name
        ("gpt2-medium", None, "gpt2-medium"),
        ("runs/chat", "my-bot", "my-bot"),  # --served-model-name wins
    ],
)
def test_the_served_model_id_is_the_run_name(spec, given, name):
    from gpt2lab.serve.server import served_name

    assert served_name(spec, given) == name


def test_a_chat_models_calculator_calls_are_answered_and_shown_as_text(model, tokenizer):
    """A chat model's sequences carry the calculator, its call tokens never end a reply, and a call the model
    writes reads <<2+3=5>> in the reply's text, the answer forced by the engine's tool."""
    from gpt2lab.chat.template import call_marks
    from gpt2lab.serve.reply import ReplyText
    from gpt2lab.serve.schemas import ChatRequest
    from gpt2lab.serve.service import Service

    service = Service(Engine(model, max_batch=1), tokenizer, True, ServeLimits(), "gpt2lab")
    assert set(call_marks(tokenizer)) and not service.end_ids & set(call_marks(tokenizer))
    job = service.chat_job(ChatRequest(messages=user("what is 2+3?"), max_tokens=20))
    seq = service.sequences(job, lambda *_: None)[0]
    call = [tokenizer.special_id("<|tool_start|>"), *tokenizer.encode_ordinary("2+3"),
            tokenizer.special_id("<|tool_end|>")]  # fmt: skip
    forced = seq.tool.forced(call)
    assert forced[0] == tokenizer.special_id("<|output_start|>") and tokenizer.decode(forced[1:-1]) == "5"
    text = ReplyText(tokenizer, (), service.think_ids, service.marks)
    shown = "".join(text.push(t).text for t in [*tokenizer.encode_ordinary("So "), *call, *forced])
    shown += text.flush("stop").text
    assert shown == "So <<2+3=5>>"
    base = Service(Engine(model, max_batch=1), tokenizer, False, ServeLimits(), "gpt2lab")
    assert base.calculator is None and not base.marks  # a base model never saw the call tokens
