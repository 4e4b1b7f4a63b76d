"""The chat format: one function turns a conversation into token ids and the mask of trained tokens.

A conversation is OpenAI's list of ``{"role", "content"}`` messages: an optional system message first, then
user and assistant messages. It is rendered as

    <|endoftext|> [<|system_start|> text <|system_end|>] <|user_start|> text <|user_end|>
    <|assistant_start|> text <|assistant_end|> ...

An assistant message may carry its reasoning (``reasoning_content``, the field OpenAI-compatible servers use):
it is rendered inside the turn, before the answer, as ``<think> reasoning </think> answer``, and trained like
the answer. <|endoftext|> opens the conversation as it opened every document GPT-2 saw. Contents are encoded
as plain text (``encode_ordinary``), so a message holding the string ``<|user_start|>`` or ``<|endoftext|>``
stays text and can never forge a role. The mask is 1 on the tokens SFT trains: each assistant message's
content and its <|assistant_end|> (the model learns to stop), never the prompt or the <|assistant_start|> it
is given. SFT, ``gpt2lab chat`` and the exported Jinja template (``CHAT_TEMPLATE``, tested equal) all use this
format.

A calculator call, written in an assistant's text as GSM8K's ``<<48/2=24>>``, renders with ``tools`` as
``<|tool_start|> 48/2 <|tool_end|> <|output_start|> 24 <|output_end|>``, its output untrained (the engine forces
it: ``gpt2lab.inference.tools``); ``split_reply`` shows a generated call as ``<<48/2=24>>`` again. The Jinja
template knows no calls: it renders ``<<48/2=24>>`` as plain text, as ``tools=False`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.tools import split_calls
from gpt2lab.tokenizer.bpe import EOT_TOKEN, SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")
# A base model (never fine-tuned on the special tokens) is spoken to in a plain transcript instead,
# "User: ...\nAssistant: ...", and goes on to write the next turn itself: its reply ends at PLAIN_STOP.
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"
# A calculator call's tokens in replies shown as text: <|tool_start|> 48/2 <|tool_end|> <|output_start|> 24
# <|output_end|> reads <<48/2=24>>, GSM8K's annotation (gpt2lab.inference.tools).
CALL_MARKS = {"<|tool_start|>": "<<", "<|tool_end|>": "=", "<|output_start|>": "", "<|output_end|>": ">>"}

# The same rendering for transformers' apply_chat_template (written into an exported tokenizer_config.json).
CHAT_TEMPLATE = (
    "{{ '" + EOT_TOKEN + "' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '_start|>' }}"
    "{% if message['role'] == 'assistant' and message.get('reasoning_content') is not none %}"
    "{{ '<think>' + message['reasoning_content'] + '</think>' }}"
    "{% endif %}"
    "{{ message['content'] + '<|' + message['role'] + '_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


def check_conversation(messages: Sequence[dict], generation: bool = False) -> None:
    """Raise Gpt2LabError naming the first bad message (index and why)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise Gpt2LabError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise Gpt2LabError(f"message {i}: must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise Gpt2LabError(f"message {i}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise Gpt2LabError(f"message {i}: content must be a string (got {type(m['content']).__name__})")
        if m.get("reasoning_content") is not None and (
            m["role"] != "assistant" or not isinstance(m["reasoning_content"], str)
        ):
            raise Gpt2LabError(f"message {i}: reasoning_content must be a string, on an assistant message")
        if m["role"] == "system" and i > 0:
            why = "a second system message" if messages[0]["role"] == "system" else "the system message must be first"
            raise Gpt2LabError(f"message {i}: {why}")
    if generation and messages[-1]["role"] != "user":
        raise Gpt2LabError(
            f"message {len(messages) - 1}: a conversation to answer must end with a user message "
            f"(got {messages[-1]['role']!r})"
        )


def render(
    messages: Sequence[dict], tokenizer, generation: bool = False, tools: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation; with ``generation`` it ends with <|assistant_start|> for the model to answer.

    mask[i] = 1 where ids[i] is trained: assistant contents and their <|assistant_end|>.
    tools: each calculator call ``<<expr=result>>`` in an assistant's content or reasoning becomes its token form
    (``gpt2lab.inference.tools``); the output the engine forces, <|output_start|> result <|output_end|>, has mask 0.
    """
    check_conversation(messages, generation)
    ids, mask = [tokenizer.eot], [0]
    for m in messages:
        role = m["role"]
        trained, calls = int(role == "assistant"), tools and role == "assistant"
        body, body_mask = _encode(m["content"], tokenizer, calls)
        body, body_mask = body + [tokenizer.special_id(f"<|{role}_end|>")], body_mask + [1]
        if m.get("reasoning_content") is not None:
            think, think_mask = _encode(m["reasoning_content"], tokenizer, calls)
            body = [tokenizer.special_id("<think>"), *think, tokenizer.special_id("</think>"), *body]
            body_mask = [1, *think_mask, 1, *body_mask]
        ids += [tokenizer.special_id(f"<|{role}_start|>")] + body
        mask += [0] + [trained * k for k in body_mask]
    if generation:
        ids.append(tokenizer.special_id("<|assistant_start|>"))
        mask.append(0)
    return ids, mask


def _encode(text: str, tokenizer, tools: bool) -> tuple[list[int], list[int]]:
    """(ids, mask) of a message's text: plain text, or with ``tools`` its calls in token form, outputs untrained."""
    if not tools:
        ids = tokenizer.encode_ordinary(text)
        return ids, [1] * len(ids)
    ids, mask = [], []
    for piece in split_calls(text):
        if isinstance(piece, str):
            plain = tokenizer.encode_ordinary(piece)
            ids.extend(plain)
            mask.extend([1] * len(plain))
            continue
        expr, result = piece
        start, end, out_start, out_end = (tokenizer.special_id(t) for t in CALL_MARKS)
        call = [start, *tokenizer.encode_ordinary(expr), end]
        out = [out_start, *tokenizer.encode_ordinary(result), out_end]
        ids.extend(call + out)
        mask.extend([1] * len(call) + [0] * len(out))  # the engine forces the output: never trained
    return ids, mask


def render_prompt(messages: Sequence[dict], tokenizer, tools: bool = False) -> list[int]:
    """The ids the model continues to answer a conversation ending with a user message (``tools``: see render)."""
    return render(messages, tokenizer, generation=True, tools=tools)[0]


def split_reply(ids: Sequence[int], tokenizer) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a generated reply's ids: the text inside <think>...</think>, and the rest.

    The reply ends at <|assistant_end|> (or wherever the ids end); the answer is the text outside the first
    thinking span. A thinking span never closed is all reasoning and no answer (even with text before it: a
    reply cut off mid-thought states nothing), the rule ``gpt2lab.rl.scoring.final_text`` applies to text.
    A calculator call shows in its text form, ``<<expr=result>>`` as GSM8K writes it (an unfinished one shows
    what it has: ``<<48/2=``); other special tokens are dropped from the text.
    """
    think, end_think = tokenizer.special_id("<think>"), tokenizer.special_id("</think>")
    end = tokenizer.special_id("<|assistant_end|>")
    ids = list(ids)
    ids = ids[: ids.index(end)] if end in ids else ids
    if think not in ids:  # a </think> alone closes a span the prompt opened: the reasoning is what precedes it
        if end_think in ids:
            stop = ids.index(end_think)
            return _text(ids[:stop], tokenizer), _text(ids[stop + 1 :], tokenizer)
        return None, _text(ids, tokenizer)
    start = ids.index(think)
    if end_think not in ids[start:]:
        return _text(ids[start + 1 :], tokenizer), ""
    stop = ids.index(end_think, start)
    return _text(ids[start + 1 : stop], tokenizer), _text(ids[:start] + ids[stop + 1 :], tokenizer)


def call_marks(tokenizer) -> dict[int, str]:
    """The calculator's token ids -> the text they show as (``CALL_MARKS``)."""
    return {tokenizer.special_id(t): text for t, text in CALL_MARKS.items()}


def _text(ids: list[int], tokenizer) -> str:
    """Text of reply ids: the call tokens as the marks of GSM8K's text form, other special tokens dropped."""
    special = {tokenizer.eot, *(tokenizer.special_id(t) for t in SPECIAL_TOKENS)}
    marks = call_marks(tokenizer)
    pieces, run = [], []
    for i in ids:
        if i in marks:  # text runs are decoded whole: a character's UTF-8 bytes may span tokens
            pieces += [tokenizer.decode(run), marks[i]]
            run = []
        elif i not in special:
            run.append(i)
    return "".join(pieces) + tokenizer.decode(run)


def render_plain_prompt(messages: Sequence[dict], tokenizer) -> list[int]:
    """A base model's prompt: the conversation as a "User:/Assistant:" transcript, ending "Assistant:"."""
    check_conversation(messages, generation=True)
    text = "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"
    return [tokenizer.eot] + tokenizer.encode_ordinary(text)


def fit_history(
    messages: list[dict], tokenizer, budget: int, render: Callable = render_prompt, tools: bool = False
) -> tuple[list[dict], int]:
    """(messages whose prompt fits ``budget`` tokens, how many were dropped): oldest turns first, system kept.

    A turn is dropped whole (a user message and the replies after it), so the history stays a conversation;
    the last user message is never dropped: if it alone is too long, the error says so. tools: the chat format's
    calls in token form (``render``'s).
    """
    if render is render_prompt:  # the chat format: each message tokenised once (see _fit_chat)
        return _fit_chat(messages, tokenizer, budget, tools)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest, dropped = list(messages[len(system) :]), 0
    while len(render(system + rest, tokenizer)) > budget:
        starts = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
        if not starts:
            raise _no_fit(budget)
        dropped += starts[0]
        rest = rest[starts[0] :]
    return system + rest, dropped


def _no_fit(budget: int) -> Gpt2LabError:
    return Gpt2LabError(f"the last message alone does not fit the model's context ({budget} tokens for the prompt)")


def _message_tokens(m: dict, tokenizer, tools: bool = False) -> int:
    """How many ids ``render`` gives message ``m``: its start and end tokens, its content, its reasoning if any."""
    tools = tools and m["role"] == "assistant"
    n = 2 + len(_encode(m["content"], tokenizer, tools)[0])
    if m.get("reasoning_content") is not None:
        n += 2 + len(_encode(m["reasoning_content"], tokenizer, tools)[0])
    return n


def _fit_chat(messages: list[dict], tokenizer, budget: int, tools: bool = False) -> tuple[list[dict], int]:
    """``fit_history`` for ``render_prompt`` in one pass: its ids are <|endoftext|>, each message's own ids (special
    tokens around plain-text contents, so no merge crosses a message) and <|assistant_start|>, so a history's
    length is 2 plus the sum of its messages' lengths, and re-rendering after each dropped turn is not needed."""
    check_conversation(messages, generation=True)
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    sizes = [_message_tokens(m, tokenizer, tools) for m in rest]
    total = 2 + sum(_message_tokens(m, tokenizer, tools) for m in system) + sum(sizes)
    start = 0
    while total > budget:
        nxt = next((i for i in range(start + 1, len(rest)) if rest[i]["role"] == "user"), None)
        if nxt is None:
            raise _no_fit(budget)
        total -= sum(sizes[start:nxt])
        start = nxt
    return system + list(rest[start:]), start
