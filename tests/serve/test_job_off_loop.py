"""Building a request's job (checks, tokenisation, fitting the history) runs off the event loop: a huge chat
request being prepared never keeps the server from answering the others."""

from __future__ import annotations

import threading

import httpx
import pytest

from gpt2lab.serve.limits import ServeLimits
from tests.serve.conftest import serving, tiny_chat_model

HELD = 20.0  # how long the big request's job building waits for the test at most (seconds)


def huge_chat() -> dict:
    """256 messages of 500 characters: the default limits' most (256 messages, 128,000 characters)."""
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i:03d} " + "word " * 99 + "."} for i in range(255)
    ]
    messages.append({"role": "user", "content": "the question " + "x" * 487})
    assert len(messages) == 256 and sum(len(m["content"]) for m in messages) == 128_000
    return {"messages": messages, "max_tokens": 2}


@pytest.fixture(scope="module")
def served(tokenizer):
    with serving(tiny_chat_model(block_size=256), tokenizer, ServeLimits(), max_batch=4, max_queue=8) as s:
        yield s


def test_other_requests_are_answered_while_a_huge_chat_request_is_prepared(served, monkeypatch):
    """The big request's job building is held until the others are answered: on the event loop (the old code)
    it would hold the whole server, and /health would time out instead."""
    preparing, release = threading.Event(), threading.Event()
    build = served.service.chat_job

    def held_chat_job(body):
        if len(body.messages) == 256:
            preparing.set()
            release.wait(HELD)
        return build(body)

    monkeypatch.setattr(served.service, "chat_job", held_chat_job)
    order, big = [], {}

    def send_big():
        big["response"] = httpx.post(served.url + "/v1/chat/completions", json=huge_chat(), timeout=60)
        order.append("big")

    sender = threading.Thread(target=send_big)
    sender.start()
    try:
        assert preparing.wait(HELD)
        health = httpx.get(served.url + "/health", timeout=HELD / 4)
        order.append("health")
        small = {"prompt": "Once upon", "max_tokens": 3, "stream": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=small, timeout=HELD / 4) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        order.append("stream")
    finally:
        release.set()
        sender.join(60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert events[-1] == "data: [DONE]" and len(events) >= 4  # three token chunks, then [DONE]
    assert order == ["health", "stream", "big"]
    assert big["response"].status_code == 200
    usage = big["response"].json()["usage"]
    assert usage["completion_tokens"] == 2 and usage["prompt_tokens"] <= 256 - 2  # the history was fitted


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}, "messages",
         "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages", None),
        ("/v1/completions", {"prompt": [[1, 2], [10**9]]}, "prompt", None),
        ("/v1/completions", {"prompt": "word " * 400}, "prompt", "context_length_exceeded"),
    ],
)  # fmt: skip
def test_an_error_raised_while_building_the_job_in_a_thread_is_still_a_400(served, path, body, param, code):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(BadRequestError) as e:
        client.post(path.removeprefix("/v1"), body=body, cast_to=object)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["code"] == code and e.value.body["type"]


def test_the_long_request_benchmark_sends_the_largest_chat_the_default_limits_accept(served):
    from gpt2lab.bench.serve import huge_chat
    from gpt2lab.cli.main import build_parser
    from gpt2lab.serve.schemas import ChatRequest

    body = huge_chat()
    messages = body["messages"]
    assert len(messages) == ServeLimits().max_messages
    assert sum(len(m["content"]) for m in messages) == ServeLimits().max_total_chars
    job = served.service.chat_job(ChatRequest(**body))  # passes every check, and its history is fitted
    assert job.trimmed > 0 and len(job.prompt) <= served.service.block_size
    assert build_parser().parse_args(["bench", "serve", "--long-request", "4"]).long_request == 4
