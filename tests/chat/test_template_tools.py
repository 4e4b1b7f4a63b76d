"""Calculator calls in the chat format: <<expr=result>> rendered as tool tokens with the forced output untrained,
and shown again as GSM8K's text when a reply is decoded."""

from __future__ import annotations

import json

import pytest

from gpt2lab.chat.template import fit_history, render, render_prompt, split_reply
from gpt2lab.tokenizer.bpe import SPECIAL_TOKENS, get_tokenizer
from tests.conftest import SHARED_DATA

QUESTION = {"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in all?"}
ANSWER = "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def ids_of(tok, *parts) -> list[int]:
    """Text parts encoded as plain text, special-token names as their ids."""
    out = []
    for part in parts:
        out += [tok.special_id(part)] if part in SPECIAL_TOKENS else tok.encode_ordinary(part)
    return out


def gsm8k_answers(n: int) -> list[str]:
    lines = (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["answer"] for line in lines]


def test_without_tools_an_annotation_stays_plain_text(tok):
    messages = [QUESTION, {"role": "assistant", "content": ANSWER}]
    ids, mask = render(messages, tok)
    assert (ids, mask) == render(messages, tok, tools=False)
    reply = ids[ids.index(tok.special_id("<|assistant_start|>")) + 1 :]
    assert reply == [*tok.encode_ordinary(ANSWER), tok.special_id("<|assistant_end|>")]
    assert mask[-len(reply) :] == [1] * len(reply)


def test_with_tools_a_call_is_tool_tokens_and_its_output_is_not_trained(tok):
    ids, mask = render([QUESTION, {"role": "assistant", "content": ANSWER}], tok, tools=True)
    start = ids.index(tok.special_id("<|assistant_start|>")) + 1
    call = ("<|tool_start|>", "<|tool_end|>")
    output = ("<|output_start|>", "<|output_end|>")
    expected = [
        ("In May she sold 48/2 = ", 1), (call[0], 1), ("48/2", 1), (call[1], 1),
        (output[0], 0), ("24", 0), (output[1], 0),
        ("24 clips.\nIn all 48+24 = ", 1), (call[0], 1), ("48+24", 1), (call[1], 1),
        (output[0], 0), ("72", 0), (output[1], 0),
        ("72 clips.\n#### 72", 1), ("<|assistant_end|>", 1),
    ]  # fmt: skip
    want_ids, want_mask = [], []
    for part, trained in expected:
        piece = ids_of(tok, part)
        want_ids, want_mask = want_ids + piece, want_mask + [trained] * len(piece)
    assert ids[start:] == want_ids and mask[start:] == want_mask
    prompt = render([QUESTION], tok, generation=True)[0]
    assert ids[:start] == prompt and not any(mask[:start])  # the prompt is as without tools, untrained


def test_calls_in_reasoning_render_too_and_a_users_annotation_stays_text(tok):
    user = {"role": "user", "content": "Is <<2+2=4>> right?"}
    reply = {"role": "assistant", "reasoning_content": "2+2 = <<2+2=4>>4", "content": "yes"}
    ids, mask = render([user, reply], tok, tools=True)
    think = ids.index(tok.special_id("<think>"))
    assert ids[:think] == render([user], tok, generation=True)[0]  # the user's <<...>> is text
    assert ids[think:] == ids_of(
        tok, "<think>", "2+2 = ", "<|tool_start|>", "2+2", "<|tool_end|>", "<|output_start|>", "4",
        "<|output_end|>", "4", "</think>", "yes", "<|assistant_end|>",
    )  # fmt: skip
    untrained = [i for i, m in zip(ids[think:], mask[think:]) if not m]
    assert untrained == ids_of(tok, "<|output_start|>", "4", "<|output_end|>")


def test_split_reply_shows_calls_as_gsm8k_writes_them(tok):
    """Rendered with tools and decoded again, GSM8K's solutions come back exactly (first 200 train records)."""
    calls = 0
    for answer in gsm8k_answers(200):
        ids, _ = render([QUESTION, {"role": "assistant", "content": answer}], tok, tools=True)
        reply = ids[ids.index(tok.special_id("<|assistant_start|>")) + 1 :]
        assert split_reply(reply, tok) == (None, answer)
        calls += reply.count(tok.special_id("<|tool_start|>"))
    assert calls > 500
    reasoned = {"role": "assistant", "reasoning_content": "48/2 = <<48/2=24>>24", "content": "24"}
    ids, _ = render([QUESTION, reasoned], tok, tools=True)
    assert split_reply(ids[ids.index(tok.special_id("<|assistant_start|>")) + 1 :], tok) == (
        "48/2 = <<48/2=24>>24",
        "24",
    )


@pytest.mark.parametrize(
    "parts, text",
    [
        (["So ", "<|tool_start|>", "48/"], "So <<48/"),
        (["So ", "<|tool_start|>", "48/2", "<|tool_end|>"], "So <<48/2="),
        (["So ", "<|tool_start|>", "48/2", "<|tool_end|>", "<|output_start|>", "2"], "So <<48/2=2"),
        (["<|tool_start|>", "1/0", "<|tool_end|>", "<|output_start|>", "error", "<|output_end|>"], "<<1/0=error>>"),
    ],
)
def test_an_unfinished_call_shows_what_it_has(tok, parts, text):
    assert split_reply(ids_of(tok, *parts), tok) == (None, text)


def test_split_reply_keeps_characters_whole_around_a_call(tok):
    ids = [*tok.encode_ordinary("😀"), *ids_of(tok, "<|tool_start|>", "1+1", "<|tool_end|>")]
    ids += [*ids_of(tok, "<|output_start|>", "2", "<|output_end|>"), *tok.encode_ordinary("é")]
    assert len(tok.encode_ordinary("😀")) > 1  # a character split over tokens
    assert split_reply(ids, tok) == (None, "😀<<1+1=2>>é")


def test_fit_history_counts_a_histories_calls_as_render_prompt_does(tok):
    history = [QUESTION, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And in June?"}]
    for tools in (False, True):
        budget = len(render_prompt(history, tok, tools=tools))
        assert fit_history(history, tok, budget, tools=tools) == (history, 0)
        assert fit_history(history, tok, budget - 1, tools=tools) == (history[2:], 2)
    assert len(render_prompt(history, tok, tools=True)) != len(render_prompt(history, tok))
