"""`gpt2lab chat`: a multi-turn conversation in the terminal, streamed token by token.

Each turn renders the whole history with ``gpt2lab.chat.template`` (the format SFT trained) and decodes with
the engine (``gpt2lab.inference.engine``, which answers the model's calculator calls, shown as ``<<48/2=24>>``)
until <|assistant_end|>. When the history no longer fits the context (the prompt plus room for a reply), the
oldest turns are dropped, the system message kept, and a notice says so. Text is released only at whole UTF-8
characters (``TextStream``). Ctrl-C stops the current reply and keeps what was said; at the prompt it leaves.
A base model (not fine-tuned with ``gpt2lab sft``) has never seen the special
tokens, so it gets the conversation as a plain "User:/Assistant:" transcript instead, with a warning.

Commands: /reset, /system TEXT, /temp X, /quit, /help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from gpt2lab.chat.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from gpt2lab.chat.template import PLAIN_STOP, call_marks, fit_history, render_plain_prompt, render_prompt
from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.engine import Engine, Sequence
from gpt2lab.inference.generate import TextStream, check_sampling_args
from gpt2lab.inference.tools import Calculator

HELP = "commands: /reset (new conversation), /system TEXT, /temp X, /quit; Ctrl-C stops a reply"


@dataclass
class Sampling:
    """The sampling settings of a reply (the flags of `gpt2lab sample`)."""

    max_new_tokens: int = 256
    temperature: float = DEFAULT_TEMPERATURE  # the server's too (gpt2lab.serve.limits)
    top_k: int | None = DEFAULT_TOP_K
    top_p: float | None = None
    seed: int | None = None


@dataclass
class Chat:
    """A conversation with one model: its history and how replies are sampled."""

    model: object  # gpt2lab.model.gpt.GPT, in eval mode
    tokenizer: object
    chat_model: bool = True  # False: a base model, spoken to in a plain-text transcript
    system: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()
        self.engine = Engine(self.model, max_batch=1)
        self.marks = call_marks(self.tokenizer) if self.chat_model else {}  # the calculator's tokens, as text

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.chat_model:  # its calls, <<48/2=24>> in the history, render as it wrote them
            return render_prompt(messages, self.tokenizer, tools=True)
        return render_plain_prompt(messages, self.tokenizer)

    def fit(self) -> int:
        """Drop the oldest turns until the prompt leaves room for a reply; return how many messages went."""
        block = self.model.config.block_size
        budget = block - min(self.sampling.max_new_tokens, block // 2)
        render = render_prompt if self.chat_model else render_plain_prompt
        self.messages, dropped = fit_history(self.messages, self.tokenizer, budget, render, tools=self.chat_model)
        return dropped

    def reply_tokens(self) -> Iterator[int]:
        """The reply's token ids as they are sampled, up to (not including) the end of the turn.

        A chat model's <think> and </think> are yielded (they open and close its reasoning), and its calculator
        calls (the engine forces each answer: ``gpt2lab.inference.tools``); any other special token ends the reply.
        """
        ids = self.prompt_ids(self.messages)
        s = self.sampling
        room = self.model.config.block_size - len(ids)  # never slide the window: the system message would go
        go_on = {*self.think_ids(), *self.marks}
        ends = frozenset(range(self.tokenizer.eot, self.model.config.vocab_size)) - go_on  # the special tokens
        tool = Calculator(self.tokenizer) if self.chat_model else None
        seq = Sequence(ids, min(s.max_new_tokens, room), None, s.temperature, s.top_k, s.top_p, s.seed, ends, tool=tool)
        yield from self.engine.stream(seq)

    def think_ids(self) -> tuple[int, ...]:
        if not self.chat_model:
            return ()
        return self.tokenizer.special_id("<think>"), self.tokenizer.special_id("</think>")

    def say(self, text: str, out: TextIO) -> str:
        """Add a user message, stream the reply to out, keep its answer in the history; return the answer.

        Reasoning (between <think> and </think>) is shown dimmed on a terminal, between the tags in a pipe,
        and left out of the history, as chat models with a thinking stage are served.
        """
        self.messages.append({"role": "user", "content": text})
        dropped = self.fit()
        if dropped:
            block = self.model.config.block_size
            notice(f"the conversation outgrew the context ({block} tokens): dropped the {dropped} oldest messages")
        stream, thought = TextStream(self.tokenizer, None, self.marks), TextStream(self.tokenizer, None, self.marks)
        think = self.think_ids()
        style = ("\033[2m", "\033[0m") if out.isatty() else ("<think>", "</think>")
        thinking = False
        stop_at = PLAIN_STOP if not self.chat_model else None  # a base model goes on to write the next turn
        tokens = self.reply_tokens()
        try:
            for token in tokens:
                if token in think:
                    thinking = token == think[0]
                    out.write(style[0] if thinking else thought.flush() + style[1])
                else:
                    out.write((thought if thinking else stream).push(token))
                out.flush()
                if stop_at and stop_at in stream.text:
                    break
        except KeyboardInterrupt:
            out.write(" [stopped]")
        finally:
            tokens.close()  # the engine drops the reply (stopped, or cut at PLAIN_STOP)
        if thinking:
            out.write(thought.flush() + style[1])
        stream.flush()
        reply = stream.text.split(stop_at)[0] if stop_at else stream.text
        out.write("\n")
        out.flush()
        self.messages.append({"role": "assistant", "content": reply.strip() if not self.chat_model else reply})
        return reply

    def command(self, line: str) -> bool:
        """Run a /command; return False for /quit."""
        name, _, arg = line.partition(" ")
        if name == "/quit":
            return False
        if name == "/reset":
            self.reset()
            notice("new conversation")
        elif name == "/system":
            self.system = arg.strip()
            self.messages = [m for m in self.messages if m["role"] != "system"]
            if self.system:
                self.messages.insert(0, {"role": "system", "content": self.system})
            notice(f"system message {'set' if self.system else 'removed'}")
        elif name == "/temp":
            try:
                value = float(arg)
                check_sampling_args(1, 1, value, None, None)
            except (ValueError, Gpt2LabError):
                notice(f"/temp takes a number >= 0 (got {arg.strip()!r})")
                return True
            self.sampling.temperature = value
            notice(f"temperature {value}")
        else:
            notice(HELP)
        return True


def notice(text: str) -> None:
    print(f"[{text}]", file=sys.stderr, flush=True)


def run(chat: Chat, stdin: TextIO, out: TextIO) -> None:
    """Read lines from stdin until /quit or end of input; each line is a user message or a command."""
    interactive = stdin.isatty()
    while True:
        try:
            if interactive:
                out.write("you> ")
                out.flush()
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave
            out.write("\n")
            return
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return
            continue
        if interactive:
            out.write("assistant> ")
        chat.say(line, out)


def chat_command(args: argparse.Namespace) -> int:
    """`gpt2lab chat --model RUN`: load the model, warn if it is a base model, then talk."""
    from gpt2lab.chat.base import is_chat_model
    from gpt2lab.inference.generate import check_device
    from gpt2lab.interop.load import load_model
    from gpt2lab.interop.tokenizer_match import model_tokenizer
    from gpt2lab.runtime.dist import default_device

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    check_sampling_args(1, sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p)
    device = check_device(args.device or default_device())
    tokenizer = model_tokenizer(args.model, args.tokenizer)  # the model's own: GPT-2's or a trained one
    chat_model = is_chat_model(args.model)
    model = load_model(args.model, device, args.dtype)
    if not chat_model:
        print(
            f"warning: {args.model} is a base model, not fine-tuned for chat (gpt2lab sft): it gets a plain "
            "'User:/Assistant:' transcript and will continue text rather than answer",
            file=sys.stderr,
        )
    chat = Chat(model, tokenizer, chat_model, args.system or "", sampling)
    notice(f"chatting with {args.model} ({model.config.block_size}-token context); {HELP}")
    run(chat, sys.stdin, sys.stdout)
    return 0
