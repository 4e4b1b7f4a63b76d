"""`gpt2lab serve` keeps OpenAI's API contract: every request field is honoured or refused with a 400 naming it,
an unknown model is OpenAI's 404, penalties and logit_bias are OpenAI's formula (checked against a few-line
reference decoder on full forward passes), and responses carry what the `openai` client reads."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from gpt2lab import __version__
from gpt2lab.chat.template import render_prompt
from gpt2lab.serve.limits import ServeLimits
from gpt2lab.serve.schemas import ChatRequest
from tests.conftest import assert_close_f32
from tests.serve.conftest import serving, tiny_chat_model

BLOCK = 128


@pytest.fixture(scope="module")
def model():
    return tiny_chat_model(BLOCK)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with serving(model, tokenizer, ServeLimits(max_n=3), max_batch=4, max_queue=16) as served:
        yield served


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)


def user(text) -> list[dict]:
    return [{"role": "user", "content": text}]


@torch.no_grad()
def reference_greedy(model, ids: list[int], n: int, presence=0.0, frequency=0.0, bias=None) -> list[int]:
    """Greedy decoding by full forward passes, with OpenAI's definition of the penalties and logit_bias:
    logits[j] -= frequency * count[j] + presence * (count[j] > 0); logits[j] += bias[j]."""
    counts, out = torch.zeros(model.config.vocab_size), []
    for _ in range(n):
        logits = model(torch.tensor([ids + out]))[0][0, -1].float()
        logits = logits - frequency * counts - presence * (counts > 0).float()
        for token, b in (bias or {}).items():
            logits[token] += b
        out.append(int(logits.argmax()))
        counts[out[-1]] += 1
    return out


def text_of(tokens: list[int], tokenizer) -> str:
    """The reply's text: its tokens up to the first special one (where the server ends the reply)."""
    cut = next((i for i, t in enumerate(tokens) if t >= tokenizer.eot), len(tokens))
    return tokenizer.decode(tokens[:cut])


# ----------------------------------------------------------------------------- 1. the model name


def test_an_unknown_model_is_openais_404_model_not_found(client, server):
    for call in (
        lambda: client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2),
        lambda: client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2, stream=True),
        lambda: client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2),
        lambda: client.models.retrieve("gpt-4o"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
        assert e.value.type == "invalid_request_error" and "gpt-4o" in e.value.message
    served = client.models.retrieve("gpt2lab")
    assert served.id == "gpt2lab" and served.object == "model" and served.owned_by == "gpt2lab"
    # no model at all: the one served
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "gpt2lab"


# ----------------------------------------------------------------------------- 2. fields honoured or refused

REFUSED = {
    "response_format json": ("chat", "response_format", {"type": "json_object"}),
    "tools": ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    "tool_choice auto": ("chat", "tool_choice", "auto"),
    "functions": ("chat", "functions", [{"name": "f", "parameters": {}}]),
    "function_call auto": ("chat", "function_call", "auto"),
    "top_logprobs without logprobs": ("chat", "top_logprobs", 2),
    "top_logprobs over 20": ("chat", "top_logprobs", 21),
    "modalities audio": ("chat", "modalities", ["text", "audio"]),
    "suffix": ("completions", "suffix", " the end"),
    "best_of > n": ("completions", "best_of", 3),
    "logprobs over 5": ("completions", "logprobs", 6),
    "max_tokens 0 without echo": ("completions", "max_tokens", 0),
    "an empty list of prompts": ("completions", "prompt", []),
    "a token id past the vocabulary": ("completions", "prompt", [1, 10_000_000]),
    "presence_penalty > 2": ("chat", "presence_penalty", 2.5),
    "frequency_penalty < -2": ("completions", "frequency_penalty", -2.5),
    "logit_bias not a token id": ("chat", "logit_bias", {"hello": 5}),
    "logit_bias past the vocabulary": ("completions", "logit_bias", {"10000000": 5}),
    "logit_bias over 100": ("chat", "logit_bias", {"11": 101}),
    "stream_options without stream": ("chat", "stream_options", {"include_usage": True}),
}


def _create(client, endpoint: str, **fields):
    fields = {"model": "gpt2lab", "max_tokens": 2, **fields}
    if endpoint == "chat":
        return client.chat.completions.create(**{"messages": user("hi"), **fields})
    return client.completions.create(**{"prompt": "hi", **fields})


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_field_the_server_cannot_honour_is_a_400_naming_it(client, case):
    endpoint, field, value = REFUSED[case]
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, endpoint, **{field: value})
    assert e.value.status_code == 400 and e.value.param == field and field in e.value.message
    assert e.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    "endpoint, fields",
    [
        ("chat", {"extra_body": {"frobnicate": 1}}),
        ("completions", {"extra_body": {"messages": user("hi")}}),  # a chat field on the completions route
        ("chat", {"extra_body": {"stream_options": {"include_usage": True, "chunk": 3}}, "stream": True}),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(client, endpoint, fields):
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, endpoint, **fields)
    assert "unknown field" in e.value.message and e.value.param in ("frobnicate", "messages", "stream_options.chunk")


def test_an_unknown_message_field_is_a_400_naming_it(server):
    body = {"messages": [{"role": "user", "content": "hi", "name": "ann"}], "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.name"


def test_the_no_op_values_and_bookkeeping_fields_are_accepted(client, model, tokenizer):
    plain = _create(client, "chat", temperature=0).choices[0].message.content
    noop = _create(
        client, "chat", temperature=0, response_format={"type": "text"}, tool_choice="none", tools=[],
        logprobs=False, user="u1", metadata={"k": "v"}, store=False, modalities=["text"],
    )  # fmt: skip
    assert noop.choices[0].message.content == plain
    done = _create(client, "completions", temperature=0, n=2, best_of=2, echo=False, suffix="", user="u1")
    assert len(done.choices) == 2


# ----------------------------------------------------------------------------- 3. penalties and logit_bias


def test_logit_bias_minus_100_on_the_greedy_token_removes_it(client, model, tokenizer):
    ids = tokenizer.encode_ordinary("Once upon a time")
    greedy = reference_greedy(model, ids, 16)
    first = greedy[0]
    done = client.completions.create(model="gpt2lab", prompt="Once upon a time", max_tokens=16, temperature=0)
    assert done.choices[0].text == text_of(greedy, tokenizer)

    biased = client.completions.create(
        model="gpt2lab", prompt="Once upon a time", max_tokens=16, temperature=0, logit_bias={str(first): -100}
    )
    want = reference_greedy(model, ids, 16, bias={first: -100})
    assert first not in want and biased.choices[0].text == text_of(want, tokenizer)
    assert biased.choices[0].text != done.choices[0].text


def test_penalties_are_openais_formula_and_lower_repetition(client, model, tokenizer):
    messages = user("Tell me a story.")
    ids = render_prompt(messages, tokenizer)
    n = 40

    def reply(**penalties) -> str:
        done = client.chat.completions.create(model="gpt2lab", messages=messages, max_tokens=n, temperature=0,
                                              **penalties)  # fmt: skip
        return done.choices[0].message.content

    plain = reference_greedy(model, ids, n)
    for penalties in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"frequency_penalty": -0.5}):
        want = reference_greedy(
            model, ids, n, penalties.get("presence_penalty", 0), penalties.get("frequency_penalty", 0)
        )
        assert reply(**penalties) == text_of(want, tokenizer), penalties
    penalised = reference_greedy(model, ids, n, frequency=1.5)
    repeats = lambda tokens: len(tokens) - len(set(tokens))  # noqa: E731
    assert repeats(penalised) < repeats(plain) / 2, (repeats(penalised), repeats(plain))
    assert reply() == text_of(plain, tokenizer)


def test_seeded_sampling_with_penalties_is_reproducible_and_differs_from_without(client):
    def sample(**kw) -> str:
        done = _create(client, "completions", temperature=1.0, seed=5, max_tokens=20, **kw)
        return done.choices[0].text

    assert sample(frequency_penalty=2.0) == sample(frequency_penalty=2.0)
    assert sample(frequency_penalty=2.0, logit_bias={"11": 100}) != sample()


# ----------------------------------------------------------------------------- 4. content parts and roles


def test_text_parts_are_joined_and_other_parts_refused(client, server, tokenizer):
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "a bird?"}]
    job = server.service.chat_job(ChatRequest(messages=user(parts)))
    assert job.prompt == render_prompt(user("What is\na bird?"), tokenizer)  # joined as vLLM joins them
    done = client.chat.completions.create(model="gpt2lab", messages=user(parts), max_tokens=2)
    assert done.usage.prompt_tokens == len(job.prompt)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt2lab", messages=user([parts[0], image]), max_tokens=2)
    assert e.value.param == "messages.0.content.1" and "image_url" in e.value.message
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user(None)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


def test_the_developer_role_is_the_system_role(client, server, tokenizer):
    def prompt(role: str) -> list[int]:
        messages = [{"role": role, "content": "Be brief."}, *user("What is a bird?")]
        return server.service.chat_job(ChatRequest(messages=messages)).prompt

    assert (
        prompt("developer")
        == prompt("system")
        == render_prompt([{"role": "system", "content": "Be brief."}, *user("What is a bird?")], tokenizer)
    )
    developer = [{"role": "developer", "content": "Be brief."}, *user("hi")]
    assert client.chat.completions.create(model="gpt2lab", messages=developer, max_tokens=2).choices
    with pytest.raises(openai.BadRequestError) as e:  # read as system, it must come first
        client.chat.completions.create(model="gpt2lab", messages=[*user("hi"), *developer], max_tokens=2)
    assert "system message must be first" in e.value.message


# ----------------------------------------------------------------------------- 5. fingerprint and streamed usage


def test_responses_carry_a_system_fingerprint_and_streamed_usage_is_null_until_the_end(client, server):
    done = _create(client, "chat")
    assert done.system_fingerprint == f"gpt2lab-{__version__}"
    assert _create(client, "completions").system_fingerprint == done.system_fingerprint

    for path, body in (
        ("/v1/chat/completions", {"messages": user("hi")}),
        ("/v1/completions", {"prompt": "hi"}),
    ):
        body |= {"max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert all(c["system_fingerprint"] == done.system_fingerprint for c in chunks)
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), path
        assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []
        body.pop("stream_options")
        with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert not any("usage" in c for c in chunks)


# ----------------------------------------------------------------------------- 6. log-probs, echo, prompt lists


@torch.no_grad()
def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of a direct forward pass in fp32: row t is the distribution of token t + 1."""
    return torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)


def test_completion_logprobs_match_a_forward_pass_of_the_model(client, model, tokenizer):
    prompt, ids = "Once upon a time", tokenizer.encode_ordinary("Once upon a time")
    gen = reference_greedy(model, ids, 6)
    done = client.completions.create(model="gpt2lab", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    want = forward_logprobs(model, ids + gen)[len(ids) - 1 : -1]  # (6, V): the rows that predict gen
    assert lp.tokens == [tokenizer.decode([t]) for t in gen]
    assert_close_f32(torch.tensor(lp.token_logprobs), want.gather(-1, torch.tensor(gen)[:, None])[:, 0], scale=20)
    for row, top in zip(want, lp.top_logprobs):
        best = torch.topk(row, 3)
        assert set(top) == {tokenizer.decode([t]) for t in best.indices.tolist()}  # greedy: the chosen is the top
        assert_close_f32(torch.tensor(sorted(top.values(), reverse=True)), best.values, scale=20)
    lengths = [len(t) for t in lp.tokens]
    assert lp.text_offset == [len(prompt) + sum(lengths[:k]) for k in range(6)]  # in prompt + completion


def test_echo_with_max_tokens_0_scores_the_prompt(client, model, tokenizer):
    prompt, ids = "The sea is deep and", tokenizer.encode_ordinary("The sea is deep and")
    done = client.completions.create(model="gpt2lab", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = done.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and done.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids] and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has nothing before it
    want = forward_logprobs(model, ids)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert_close_f32(torch.tensor(lp.token_logprobs[1:]), want, scale=20)

    echoed = client.completions.create(model="gpt2lab", prompt=prompt, max_tokens=5, echo=True, temperature=0)
    assert echoed.choices[0].text == prompt + text_of(reference_greedy(model, ids, 5), tokenizer)


def test_a_list_of_prompts_gets_n_choices_each_in_order(client, model, tokenizer):
    texts = ["Once upon a time", "The sea"]
    for prompt in (texts, [tokenizer.encode_ordinary(t) for t in texts]):
        done = client.completions.create(model="gpt2lab", prompt=prompt, max_tokens=4, temperature=0, n=2)
        assert [c.index for c in done.choices] == [0, 1, 2, 3]
        for c in done.choices:
            ids = tokenizer.encode_ordinary(texts[c.index // 2])
            assert c.text == text_of(reference_greedy(model, ids, 4), tokenizer)
        assert done.usage.prompt_tokens == sum(len(tokenizer.encode_ordinary(t)) for t in texts)
    one = client.completions.create(model="gpt2lab", prompt=tokenizer.encode_ordinary("The sea"), max_tokens=4,
                                    temperature=0)  # fmt: skip
    assert one.choices[0].text == text_of(reference_greedy(model, tokenizer.encode_ordinary("The sea"), 4), tokenizer)


def test_chat_logprobs_are_in_the_chat_shape_and_match_a_forward_pass(client, model, tokenizer):
    messages = user("What is a bird?")
    ids = render_prompt(messages, tokenizer)
    gen = reference_greedy(model, ids, 5)
    done = client.chat.completions.create(
        model="gpt2lab", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = done.choices[0].logprobs.content
    want = forward_logprobs(model, ids + gen)[len(ids) - 1 : -1]
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in gen]
    assert [c.bytes for c in content] == [list(tokenizer.enc.decode_single_token_bytes(t)) for t in gen]
    assert_close_f32(torch.tensor([c.logprob for c in content]), want.gather(-1, torch.tensor(gen)[:, None])[:, 0],
                     scale=20)  # fmt: skip
    for c, row in zip(content, want):
        assert [t.token for t in c.top_logprobs] == [tokenizer.decode([t]) for t in torch.topk(row, 2).indices.tolist()]
    plain = client.chat.completions.create(model="gpt2lab", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("chat", [True, False])
def test_streamed_logprobs_are_the_same_as_returned_whole(server, chat):
    if chat:
        path, body = "/v1/chat/completions", {"messages": user("hi"), "logprobs": True, "top_logprobs": 2}
    else:
        path, body = "/v1/completions", {"prompt": "Once upon", "logprobs": 2, "echo": True}
    body |= {"max_tokens": 8, "temperature": 0}
    whole = httpx.post(server.url + path, json=body, timeout=60).json()["choices"][0]["logprobs"]
    with httpx.stream("POST", server.url + path, json=body | {"stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    if chat:
        assert [e for p in parts for e in p["content"]] == whole["content"]
    else:
        assert {k: [x for p in parts for x in p[k]] for k in whole} == whole
