"""The text of a reply as its tokens arrive: whole UTF-8 characters, cut before a ``stop`` string, and a chat
reply's thinking (between <think> and </think>) kept apart from its answer."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpt2lab.inference.generate import TextStream


class StopText:
    """A choice's text as tokens arrive: whole UTF-8 characters, cut before the first stop string.

    Text that could be the start of a stop string is held back until the next token tells.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...], marks: dict[int, str] | None = None):
        self.stream, self.stops, self.held, self.text = TextStream(tokenizer, None, marks), stops, "", ""

    def push(self, token: int) -> tuple[str, bool]:
        """(text released, whether a stop string was reached)."""
        return self._release(self.stream.push(token), final=False)

    def flush(self) -> str:
        return self._release(self.stream.flush(), final=True)[0]

    def _release(self, piece: str, final: bool) -> tuple[str, bool]:
        text = self.held + piece
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            out, stopped, self.held = text[: min(hits)], True, ""
        else:
            hold = (
                0
                if final
                else max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            )
            out, stopped, self.held = text[: len(text) - hold], False, text[len(text) - hold :]
        self.text += out
        return out, stopped


@dataclass
class Piece:
    """Text of one choice that became ready: answer text, thinking text, the finish_reason at its end, and the
    log-probs of the tokens read since the last piece (when asked for: ``serve.logprobs`` entries)."""

    index: int
    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


class ReplyText:
    """A chat reply as tokens arrive: the answer (cut before a stop string) and, apart, its thinking.

    With ``think_ids`` (<think>, </think>), tokens between them are reasoning, OpenAI-compatible servers'
    ``reasoning_content``; without, a thinking token's string is plain text (the completions endpoint). ``marks``:
    the calculator's tokens, shown as the text of a call (``<<48/2=24>>``).
    """

    def __init__(
        self, tokenizer, stops: tuple[str, ...], think_ids: tuple[int, int] | None, marks: dict[int, str] | None = None
    ):
        self.answer, self.reasoning = StopText(tokenizer, stops, marks), StopText(tokenizer, (), marks)
        self.think_ids, self.thinking = think_ids, False

    def push(self, token: int) -> Piece:
        if self.think_ids and token in self.think_ids:
            self.thinking = token == self.think_ids[0]
            return Piece(0, reasoning="" if self.thinking else self.reasoning.flush())
        if self.thinking:
            return Piece(0, reasoning=self.reasoning.push(token)[0])
        text, stopped = self.answer.push(token)
        return Piece(0, text, finish_reason="stop" if stopped else None)

    def flush(self, reason: str) -> Piece:
        return Piece(0, self.answer.flush(), self.reasoning.flush(), reason)
