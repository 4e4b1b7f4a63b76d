"""`gpt2lab chat` driven through a pipe, and its history, commands, Ctrl-C and UTF-8 handling."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from gpt2lab.chat.base import CHAT_VOCAB_SIZE
from gpt2lab.chat.template import render_prompt
from gpt2lab.chat.terminal import Chat, Sampling, run
from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, save_model
from gpt2lab.inference.generate import generate_ids
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import get_tokenizer
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _model(vocab: int, block: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block, vocab_size=vocab, padded_vocab_size=50304, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny untrained model saved as a chat model (its run config has [sft] data, as gpt2lab sft writes)."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    save_model(_model(CHAT_VOCAB_SIZE), folder, extra={TRAIN_STATE_KEY: {"config": {"sft": {"data": "x.jsonl"}}}})
    return folder


def _greedy(model, tok, messages, max_new: int) -> str:
    """The reply the chat should stream: greedy tokens after the rendered prompt, up to a special token."""
    ids = render_prompt(messages, tok)
    out = generate_ids(model.eval(), ids, max_new_tokens=max_new, temperature=0, eos_id=None)[0]
    cut = next((i for i, t in enumerate(out) if t >= tok.eot), len(out))
    return tok.decode(out[:cut])


def _chat(folder, stdin: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "gpt2lab", "chat", "--model", str(folder), "--device", "cpu", *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=120)


def test_a_piped_conversation_streams_the_replies_and_obeys_the_commands(chat_folder, tok):
    from gpt2lab.interop.load import load_model

    stdin = "hello there\n/temp 0.5\n/temp 0\n/temp hot\n/system Be nice.\n/reset\nhi again\n/quit\nnever read\n"
    done = _chat(chat_folder, stdin, "--temperature", "0", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    model = load_model(str(chat_folder))
    first = _greedy(model, tok, [{"role": "user", "content": "hello there"}], 8)
    system = {"role": "system", "content": "Be nice."}
    second = _greedy(model, tok, [system, {"role": "user", "content": "hi again"}], 8)
    assert done.stdout == f"{first}\n{second}\n"
    for notice in ("[temperature 0.5]", "[temperature 0.0]", "/temp takes a number", "[system message set]",
                   "[new conversation]"):  # fmt: skip
        assert notice in done.stderr
    assert "base model" not in done.stderr


def test_a_base_model_gets_a_clear_warning_and_a_plain_transcript(tmp_path, tok, monkeypatch, capsys):
    from gpt2lab.cli.main import main

    save_model(_model(50257), tmp_path / "base")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", str(tmp_path / "base"), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "warning:" in err and "base model, not fine-tuned for chat" in err
    ids = [tok.eot, *tok.encode("User: hello\nAssistant:")]  # no special token: a base model never learnt them
    new = generate_ids(_model(50257).eval(), ids, max_new_tokens=4, temperature=0, eos_id=tok.eot)[0]
    assert out == tok.decode([t for t in new if t != tok.eot]).split("\nUser:")[0] + "\n"


def test_an_outgrown_history_drops_the_oldest_turns_keeping_the_system_message(tok, capsys):
    model = _model(CHAT_VOCAB_SIZE, block=48).eval()
    chat = Chat(model, tok, system="You are terse.", sampling=Sampling(max_new_tokens=8, temperature=0))
    for i in range(6):
        chat.say(f"message number {i} here", io.StringIO())
        assert chat.messages[0] == {"role": "system", "content": "You are terse."}
        assert len(render_prompt(chat.messages[:-1], tok)) <= 48 - 8
    assert "dropped the 2 oldest messages" in capsys.readouterr().err
    assert chat.messages[1]["content"] != "message number 0 here"


class Writes(io.StringIO):
    """Records every write, to check that none holds half a character."""

    def __init__(self):
        super().__init__()
        self.pieces = []

    def write(self, s):
        self.pieces.append(s)
        return super().write(s)


def test_ctrl_c_stops_the_reply_not_the_chat_and_text_is_released_at_whole_characters(tok, monkeypatch):
    model = _model(CHAT_VOCAB_SIZE).eval()
    emoji = tok.encode("ok 😀 é")
    assert len(emoji) > len("ok 😀 é".split())  # the emoji spans several byte tokens

    def interrupted(self):
        yield from emoji
        if len(self.messages) < 3:
            raise KeyboardInterrupt  # Ctrl-C during the first reply

    monkeypatch.setattr(Chat, "reply_tokens", interrupted)
    chat = Chat(model, tok, sampling=Sampling(max_new_tokens=8, temperature=0))
    out = Writes()
    run(chat, io.StringIO("first\nsecond\n"), out)
    assert out.getvalue() == "ok 😀 é [stopped]\nok 😀 é\n"
    assert not any("\ufffd" in p for p in out.pieces)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == "ok 😀 é"
