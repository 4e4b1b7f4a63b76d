"""Log-probabilities in OpenAI's two shapes: the legacy completions' ``{tokens, token_logprobs, top_logprobs,
text_offset}`` and chat's ``{content: [{token, logprob, bytes, top_logprobs}]}``.

An entry is ``(token id, log-prob, [(id, log-prob), ...] of the most likely tokens)``, or None for a token
with nothing before it (an echoed prompt's first). Log-probs are the model's own distribution (log-softmax of
its logits in fp32), before temperature, penalties or logit_bias, as OpenAI and vLLM report them: generated
tokens' come from the engine (``engine.Sequence.logprobs``), a prompt's from one forward pass (``prompt_entries``).
"""

from __future__ import annotations

import torch

Entry = tuple[int, float, list[tuple[int, float]]]


@torch.inference_mode()
def prompt_entries(model, ids: list[int], top: int) -> list[Entry | None]:
    """Each prompt token's log-prob given the tokens before it (the first has none: None), and the top ones."""
    logits = model(torch.tensor([ids], device=next(model.parameters()).device))[0][0, :-1]  # (T-1, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)  # (T-1,)
    chosen = logprobs.gather(-1, targets.unsqueeze(-1))[:, 0].tolist()
    entries: list[Entry | None] = [None]
    best = torch.topk(logprobs, top) if top else None
    for t, (token, lp) in enumerate(zip(ids[1:], chosen)):
        pairs = list(zip(best.indices[t].tolist(), best.values[t].tolist())) if best is not None else []
        entries.append((token, lp, pairs))
    return entries


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def token_bytes(tokenizer, token: int) -> list[int]:
    """The token's bytes (a token may hold part of a UTF-8 character: its text alone would not say which)."""
    enc = getattr(tokenizer, "enc", None)  # tiktoken's GPT-2 BPE knows each token's bytes
    if enc is not None:
        try:
            return list(enc.decode_single_token_bytes(token))
        except KeyError:  # a special token tiktoken does not hold
            pass
    return list(token_text(tokenizer, token).encode("utf-8"))


def legacy_logprobs(tokenizer, ids: list[int], entries: list[Entry | None], offset: int) -> dict:
    """/v1/completions' shape; ``offset``: where the first token's text starts in prompt + completion."""
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    tops = []
    for token, entry in zip(ids, entries):
        if entry is None:
            tops.append(None)
            continue
        top = {token_text(tokenizer, t): lp for t, lp in entry[2]}
        top.setdefault(token_text(tokenizer, token), entry[1])  # the chosen token is always there, as OpenAI's
        tops.append(top)
    logprobs = [None if e is None else e[1] for e in entries]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, entries: list[Entry]) -> dict:
    """Chat's shape: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""

    def one(token: int, lp: float) -> dict:
        return {"token": token_text(tokenizer, token), "logprob": lp, "bytes": token_bytes(tokenizer, token)}

    content = [one(t, lp) | {"top_logprobs": [one(a, b) for a, b in top]} for t, lp, top in entries]
    return {"content": content, "refusal": None}
