"""LAMBADA (Paperno et al., 2016), OpenAI's detokenized test set (5,153 passages): last-word accuracy and perplexity.

Expected results:
- GPT-2 paper, table 3, 117M: ppl 35.13, acc 45.99% (1542M: 8.63, 63.24%). The paper adds a
  stop-word filter to its accuracy, which this module does not (see below).
- lm-evaluation-harness ``lambada_openai``, scored the way this module scores, for OpenAI's gpt2
  (124M): acc 0.3256, ppl 40.06 (EleutherAI/lm-evaluation-harness issue #2159).

Scoring: each passage is split at its last space into context and target word; the target is
the word with its leading space, tokenized apart from the context. The model reads the whole
passage (the context cut from the left if longer than its window).
- acc: the word counts as right only if EVERY one of its BPE tokens is the argmax prediction
  given the true preceding tokens (so greedy decoding would produce the whole word). A word whose
  first token is predicted and second is not is wrong. What greedy decoding would write after
  the word is not looked at.
- ppl: exp of the mean, over passages, of the word's negative log-likelihood (summed over its
  tokens): perplexity per word, as the paper and the harness report it. ``ppl_token`` divides by
  the number of BPE tokens instead.
Departure from the paper: no stop-word filter, no other post-processing of predictions.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval.common import Pair, Scores, all_reduce_sum, format_table, mirror_file, read_jsonl, score_pairs, shard
from gpt2lab.runtime.dist import print0
from gpt2lab.tokenizer.bpe import Tokenizer

MIRROR_PATH = "lambada/lambada_test.jsonl"
URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"


def locate(data: str | Path | None = None) -> Path:
    if data is not None:
        return Path(data)
    path = mirror_file(MIRROR_PATH)
    if path is None:
        raise Gpt2LabError(
            f"no LAMBADA file: pass --data FILE (OpenAI's lambada_test.jsonl, {URL}) "
            f"or set GPT2LAB_MIRROR to a folder holding {MIRROR_PATH}"
        )
    return path


def split_last_word(text: str) -> tuple[str, str]:
    """(context, target) where target is the last word with its leading space."""
    text = text.strip()
    ctx, sep, word = text.rpartition(" ")
    if not sep or not ctx or not word:
        raise ValueError("no context before the last word")
    return ctx, " " + word


def load_passages(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, target word) per line of a ``{"text": ...}`` jsonl file."""
    rows = read_jsonl(path)
    if limit is not None:
        rows = rows[:limit]
    out = []
    for lineno, obj in rows:
        text = obj.get("text")
        if not isinstance(text, str):
            raise Gpt2LabError(f"{path}, line {lineno}: missing or non-string 'text'")
        try:
            out.append(split_last_word(text))
        except ValueError as e:
            raise Gpt2LabError(f"{path}, line {lineno}: {e}") from None
    return out


def encode(tokenizer: Tokenizer, passages: list[tuple[str, str]]) -> list[Pair]:
    return [(tokenizer.encode_ordinary(ctx), tokenizer.encode_ordinary(word)) for ctx, word in passages]


def score_passages(
    model: torch.nn.Module, tokenizer: Tokenizer, passages: list[tuple[str, str]], device, batch_size: int = 8
) -> Scores:
    """Per passage: the target word's summed loss, its token count, and whether greedy gets all of it."""
    return score_pairs(model, encode(tokenizer, passages), device, batch_size, desc="lambada")


def evaluate_lambada(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    passages: list[tuple[str, str]],
    device: str | torch.device,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict:
    """acc, ppl (per word), ppl_token and count over all ranks."""
    mine = shard(passages, rank, world_size)
    sums = {"correct": 0.0, "nll": 0.0, "tokens": 0.0, "count": float(len(mine))}
    if mine:
        s = score_pairs(model, encode(tokenizer, mine), device, batch_size, progress=progress, desc="lambada")
        sums.update(correct=float(s.greedy.sum()), nll=float(s.sum_loss.sum()), tokens=float(s.n_tokens.sum()))
    t = all_reduce_sum(sums, device, world_size)
    count = int(t["count"])
    return {
        "acc": t["correct"] / count if count else float("nan"),
        "ppl": math.exp(t["nll"] / count) if count else float("nan"),
        "ppl_token": math.exp(t["nll"] / t["tokens"]) if count else float("nan"),
        "correct": int(t["correct"]),
        "count": count,
    }


def run_lambada(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    device: str | torch.device,
    data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """The ``eval lambada`` command's work: load, score, print a table; returns the results."""
    path = locate(data)
    passages = load_passages(path, limit)
    print0(f"LAMBADA file: {path}")
    result = evaluate_lambada(model, tokenizer, passages, device, batch_size, rank, world_size, progress=rank == 0)
    result["file"] = str(path)
    print0(
        format_table(
            "LAMBADA (acc: whole last word greedy; ppl: per word)",
            [
                ("acc", result["acc"]),
                ("ppl", result["ppl"]),
                ("ppl_token", result["ppl_token"]),
                ("count", result["count"]),
            ],
        )
    )
    return result
