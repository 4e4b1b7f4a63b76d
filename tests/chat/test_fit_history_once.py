"""``fit_history`` tokenises each message once: it gives what re-rendering after every dropped turn gave."""

from __future__ import annotations

import random

import pytest

from gpt2lab.chat.template import fit_history, render, render_prompt
from gpt2lab.errors import Gpt2LabError

WORDS = ["hi", " there", "<|user_start|>", "\n", "  ", "é", "123", "<think>", "don't", " the", "\t\n ", "!?", "🙂"]


def old_fit_history(messages, tokenizer, budget, render=render_prompt):
    """The algorithm before the change: render the whole history again after each dropped turn."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest, dropped = list(messages[len(system) :]), 0
    while len(render(system + rest, tokenizer)) > budget:
        starts = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
        if not starts:
            raise Gpt2LabError("does not fit")
        dropped += starts[0]
        rest = rest[starts[0] :]
    return system + rest, dropped


def text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 8)))


def conversation(rng: random.Random) -> list[dict]:
    messages = [{"role": "system", "content": text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randrange(1, 7)):
        messages.append({"role": "user", "content": text(rng)})
        for _ in range(rng.randrange(0, 3)):
            m = {"role": rng.choice(["assistant", "user"]), "content": text(rng)}
            if m["role"] == "assistant" and rng.random() < 0.4:
                m["reasoning_content"] = text(rng)
            messages.append(m)
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": text(rng)})
    if rng.random() < 0.2 and messages[0]["role"] != "system":
        messages.insert(0, {"role": "assistant", "content": text(rng)})  # a history may open with a reply
    return messages


def test_a_prompt_is_its_fixed_ends_plus_each_message_tokenised_alone(tokenizer):
    """What makes the one-pass count exact: render_prompt's length is 2 plus each message's own length."""
    rng = random.Random(1)
    for _ in range(300):
        conv = conversation(rng)
        ids = render_prompt(conv, tokenizer)
        alone = [len(render([m], tokenizer)[0]) - 1 for m in conv]  # each message rendered alone, less <|endoftext|>
        assert len(ids) == 2 + sum(alone)


def test_fit_history_matches_the_old_algorithm_on_random_conversations(tokenizer):
    rng = random.Random(0)
    checked_errors = checked_drops = 0
    for _ in range(400):
        conv = conversation(rng)
        full = len(render_prompt(conv, tokenizer))
        budget = rng.randrange(2, full + 3)
        try:
            expected = old_fit_history(conv, tokenizer, budget)
        except Gpt2LabError:
            with pytest.raises(Gpt2LabError, match="the last message alone does not fit"):
                fit_history(conv, tokenizer, budget)
            checked_errors += 1
            continue
        kept, dropped = fit_history(conv, tokenizer, budget)
        assert (kept, dropped) == expected
        assert render_prompt(kept, tokenizer) == render_prompt(expected[0], tokenizer)
        assert len(render_prompt(kept, tokenizer)) <= budget
        checked_drops += dropped > 0
    assert checked_errors > 20 and checked_drops > 20  # both branches were exercised


def test_fit_history_renders_a_long_history_once(tokenizer, monkeypatch):
    """The old loop rendered the history again per dropped turn: a 256-message history means ~128 renders."""
    calls = []
    encode = tokenizer.encode_ordinary
    monkeypatch.setattr(tokenizer, "encode_ordinary", lambda s: calls.append(s) or encode(s))
    conv = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20} for i in range(255)]
    kept, dropped = fit_history(conv, tokenizer, 300)
    assert dropped > 200 and kept[-1] is conv[-1]
    assert len(calls) == len(conv)  # each message tokenised exactly once


def test_a_bad_conversation_gets_the_same_error_as_before(tokenizer):
    for bad in ([], [{"role": "assistant", "content": "x"}], [{"role": "user", "content": "x"}, {"role": "system"}]):
        with pytest.raises(Gpt2LabError) as old:
            old_fit_history(bad, tokenizer, 100)
        with pytest.raises(Gpt2LabError) as new:
            fit_history(bad, tokenizer, 100)
        assert str(new.value) == str(old.value)
