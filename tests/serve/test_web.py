"""The chat page served at / by `gpt2lab serve`, driven in a real headless browser (Debian's chromium + Playwright).

Against the live server (a tiny chat model, decoding slowed down so a reply lasts seconds): a reply streams in,
the second turn sends the whole history, Stop ends the reply in the page and the generation on the server,
New chat starts over, the settings reach the request. With answers faked by page.route: a reply holding HTML is
shown as text and never runs, a thinking span shows apart from the answer, server and network errors show in
the page, and a long reply fits a phone's width.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: .ci/run installs it when missing
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COMPLETIONS = "**/v1/chat/completions"

# ----------------------------------------------------------------------------- browser helpers


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("the browser test needs Debian's chromium at /usr/bin/chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):  # live_server: tests/serve/conftest.py
    """A fresh context (empty localStorage) on the chat page, failing the test on any uncaught page error."""
    context = browser.new_context(viewport={"width": 900, "height": 640})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(10_000)
    page.goto(live_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'gpt2lab'")
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def posted(page) -> list[dict]:
    """Every request body the page sends to /v1/chat/completions, with its Authorization header, in order."""
    bodies = []

    def keep(request):
        if request.url.endswith("/v1/chat/completions"):
            bodies.append({**request.post_data_json, "authorization": request.headers.get("authorization")})

    page.on("request", keep)
    return bodies


def send(page, text: str):
    """Type a message, press Send, and return the locator of the new assistant bubble."""
    before = page.locator(".assistant").count()
    page.fill("#input", text)
    page.click("#send")
    bubble = page.locator(".assistant").nth(before)
    bubble.wait_for()
    return bubble


def finished(bubble, state: str = "done") -> str:
    from playwright.sync_api import expect

    expect(bubble).to_have_attribute("data-state", state, timeout=20_000)
    return bubble.locator(".content").text_content()


def watch_growth(page) -> None:
    """Record in the page, at every DOM change from now on, the last reply's length and state (no polling race)."""
    page.evaluate(
        """() => { window.__growth = []; new MutationObserver(() => {
                 const b = [...document.querySelectorAll('.assistant')].at(-1);
                 if (b) window.__growth.push([b.querySelector('.content').textContent.length, b.dataset.state]);
               }).observe(document.getElementById('messages'),
                          {subtree: true, childList: true, characterData: true, attributes: true}); }"""
    )


def sse(*deltas: dict) -> str:
    """An OpenAI chat.completion.chunk stream of these deltas, as a server sends it."""
    chunks = [{"role": "assistant"}, *deltas]
    events = [
        {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "gpt2lab",
         "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
        for d in chunks
    ]  # fmt: skip
    events.append({**events[0], "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events) + "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- the tests


def test_streams_sends_history_stops_and_starts_over(page, live_server, tmp_path):
    requests = posted(page)
    page.click("#settings summary")
    page.fill("#max-tokens", "16")
    page.fill("#api-key", "sekret")

    # Turn 1: the reply streams in — its text grows over several DOM updates before it ends.
    watch_growth(page)
    first = send(page, "Hello!")
    reply1 = finished(first)
    growth = page.evaluate("window.__growth")
    partial = sorted({n for n, state in growth if state == "streaming" and 0 < n < len(reply1)})
    assert len(partial) >= 2, f"the reply did not stream in (lengths seen while streaming: {growth})"
    assert page.locator(".user").first.text_content() == "Hello!"

    # Turn 2: the whole history goes to the server, the first reply exactly as shown.
    reply2 = finished(send(page, "And then?"))
    assert [(m["role"], m["content"]) for m in requests[1]["messages"]] == [
        ("user", "Hello!"),
        ("assistant", reply1),
        ("user", "And then?"),
    ]
    assert requests[1]["stream"] is True and requests[1]["max_tokens"] == 16
    assert requests[1]["authorization"] == "Bearer sekret"
    assert reply2 and page.locator(".msg").count() == 4

    # Stop mid-reply: the text stops growing, Send works again, the server stops generating.
    page.fill("#max-tokens", "")  # the server's default: a reply of many seconds
    before = live_server.engine.generated_tokens
    third = send(page, "Tell me a long story.")
    page.wait_for_function("b => b.querySelector('.content').textContent.length > 0", arg=third.element_handle())
    page.click("#stop")
    stopped = finished(third, "stopped")
    assert "max_tokens" not in requests[2]
    time.sleep(1.0)  # the server notices the closed connection within a decoding step or two
    tokens = live_server.engine.generated_tokens
    time.sleep(1.0)
    assert live_server.engine.generated_tokens == tokens, "the server kept generating after Stop"
    assert tokens - before < 100, "Stop came after the reply was long finished: the check above proves nothing"
    assert third.locator(".content").text_content() == stopped
    assert page.is_enabled("#send") and page.is_hidden("#stop")

    # The partial reply stays in the history; settings go with the next request.
    page.fill("#temperature", "0")
    page.fill("#top-k", "3")
    page.fill("#max-tokens", "5")
    page.fill("#system", "You are terse.")
    finished(send(page, "Short, please."))
    body = requests[3]
    assert (body["temperature"], body["top_k"], body["max_tokens"]) == (0, 3, 5)
    assert [m["role"] for m in body["messages"]] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert body["messages"][0]["content"] == "You are terse." and body["messages"][6]["content"] == stopped
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # New chat: the page is empty and the next request carries only the new message.
    page.click("#new-chat")
    assert page.locator("#messages > *").count() == 0
    finished(send(page, "Hi again."))
    assert [m["role"] for m in requests[4]["messages"]] == ["system", "user"]
    # Settings, API key included, are kept in localStorage across a reload.
    page.reload()
    assert page.input_value("#api-key") == "sekret" and page.input_value("#max-tokens") == "5"


def test_reply_is_text_never_html_and_thinking_shows_apart(page):
    attack = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1"> **bold**'
    body = sse({"reasoning_content": "Weighing <b>it</b> "}, {"reasoning_content": "up."}, {"content": attack})
    page.route(COMPLETIONS, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    bubble = send(page, '<img src=y onerror="window.__pwned=2">')
    assert finished(bubble) == attack
    assert page.locator(".user").text_content() == '<img src=y onerror="window.__pwned=2">'
    assert bubble.locator("script, img").count() == 0 and page.locator(".user img").count() == 0
    assert page.evaluate("window.__pwned") is None
    thinking = bubble.locator(".thinking")
    assert thinking.is_visible() and thinking.locator(".thought").text_content() == "Weighing <b>it</b> up."
    assert thinking.get_attribute("open") is None, "the thinking block folds once the answer starts"
    thinking.locator("summary").click()
    assert thinking.locator(".thought").is_visible()


def test_a_calculator_call_shows_as_its_own_span_of_text(page):
    """<<48/2=24>> (a call the engine answered) is marked, even split over chunks; the text around stays text."""
    body = sse({"content": "Half is <<48/"}, {"content": "2=24>>24, and <<1/0=error>>."})
    page.route(COMPLETIONS, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    bubble = send(page, "halve 48")
    assert finished(bubble) == "Half is <<48/2=24>>24, and <<1/0=error>>."
    assert bubble.locator(".call").all_text_contents() == ["<<48/2=24>>", "<<1/0=error>>"]


def test_server_and_network_errors_show_in_the_page(page):
    def error(n: int) -> str:
        page.locator(".error").nth(n).wait_for()
        return page.locator(".error").nth(n).text_content()

    # The real server refuses a temperature of 5: its OpenAI-shaped error shows in the page.
    page.click("#settings summary")
    page.fill("#temperature", "5")
    page.fill("#input", "Hi")
    page.click("#send")
    assert "400" in error(0) and "temperature" in error(0)
    # Nothing came back, so the turn is taken back: the text is in the box again, ready to retry.
    assert page.locator(".user, .assistant").count() == 0 and page.input_value("#input") == "Hi"
    assert page.is_enabled("#send")

    message = "the server is busy: retry later"
    busy = {"error": {"message": message, "type": "server_busy"}}
    page.route(COMPLETIONS, lambda route: route.fulfill(status=503, json=busy))
    page.click("#send")
    assert "503" in error(1) and message in error(1)

    page.unroute(COMPLETIONS)
    page.route(COMPLETIONS, lambda route: route.abort("connectionrefused"))
    page.click("#send")
    assert "Network error" in error(2)
    assert page.locator(".user, .assistant").count() == 0 and page.input_value("#input") == "Hi"


def test_stream_parser_takes_events_split_anywhere(page):
    """The page's own SSE reader, fed one byte at a time: events, lines and UTF-8 characters split mid-way."""
    stream = sse({"content": "né 😀"}, {"content": "\u4e2d"}).replace("\n", "\r\n", 4)
    got = page.evaluate(
        """async text => {
            const bytes = new TextEncoder().encode(text);
            let i = 0;
            const one = c => i < bytes.length ? c.enqueue(bytes.slice(i, ++i)) : c.close();
            const reader = new ReadableStream({pull: one}).getReader();
            const data = [];
            await window.gpt2lab.readEvents(reader, d => data.push(d));
            return data;
        }""",
        stream,
    )
    assert got[-1] == "[DONE]"
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in got[:-1]) == "né 😀\u4e2d"


def test_fits_a_phone_screen(browser, live_server, tmp_path):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(live_server.url + "/")
    page.route(
        COMPLETIONS,
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse({"content": "x" * 400})),
    )
    finished(send(page, "y" * 300))
    page.click("#settings summary")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    # Long unbroken text wraps inside its bubble instead of running off the screen (or being clipped).
    assert page.evaluate("[...document.querySelectorAll('.msg')].every(m => m.scrollWidth <= m.clientWidth)")
    for bubble in page.locator(".msg").all():
        box = bubble.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375
    for element in ("#input", "#send", "#new-chat", "#temperature", "#system"):
        box = page.locator(element).bounding_box()
        assert page.is_visible(element) and box["x"] >= 0 and box["x"] + box["width"] <= 375, element
    page.screenshot(path=str(tmp_path / "phone.png"))
    context.close()


@pytest.fixture(scope="module")
def shakespeare(tokenizer):
    """A 64-token model served under its run's name, as `gpt2lab serve --model runs/shakespeare` names it."""
    from gpt2lab.inference.engine import Engine
    from gpt2lab.serve.app import create_app, serve_in_thread
    from gpt2lab.serve.limits import ServeLimits
    from gpt2lab.serve.service import Service
    from tests.serve.conftest import tiny_chat_model

    engine = Engine(tiny_chat_model(block_size=64), max_batch=2)
    service = Service(engine, tokenizer, True, ServeLimits(), "shakespeare")
    with serve_in_thread(create_app(service)) as url:
        yield url


def test_the_header_names_the_run_and_max_tokens_stops_at_the_context(browser, shakespeare):
    from playwright.sync_api import expect

    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.goto(shakespeare + "/")
    expect(page.locator("#model")).to_have_text("shakespeare")  # shown as "model: shakespeare"
    # a reply needs at least one prompt token: max_tokens is at most the context - 1, as the server says
    expect(page.locator("#max-tokens")).to_have_attribute("max", "63")
    requests = posted(page)
    page.route(COMPLETIONS, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse()))
    finished(send(page, "Hi"))
    assert requests[0]["model"] == "shakespeare"  # the id the server serves, not a fixed name
    context.close()
