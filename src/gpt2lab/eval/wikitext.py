"""WikiText-2 test perplexity, zero-shot, with a sliding window, the way the GPT-2 paper reports it.

Expected results: GPT-2 paper, table 3: 117M ppl 29.41 (345M 22.76, 762M 19.93, 1542M 18.34),
per WikiText word. One public report for OpenAI's gpt2 at context 1024: 29.17 per word
(huggingface/transformers issue #483); the exact figure depends on the detokenizer and the stride.

Preprocessing: the mirror holds the *tokenized* ``wiki.test.tokens`` (``@-@`` separators, spaces
around punctuation, ``<unk>``). The paper used invertible detokenizers to undo such artifacts
(worth 2.5-5 ppl); ``detokenize`` here undoes: `` @-@ `` `` @,@ `` `` @.@ `` -> ``-`` ``,`` ``.``;
spaces before ``. , ; : ! ? ) ] }`` and after ``( [ {``; spaces inside paired double quotes;
`` 's`` / `` 't`` style contractions and ``s '`` possessives; ``= = =`` headings -> ``===``; spaces at
line starts and ends. ``<unk>`` is kept as the literal text ``<unk>`` (the paper does not say what
it did; the raw, ``<unk>``-free files are not in the mirror). The whole file is one stream,
preceded by ``<|endoftext|>`` so that its first token is predicted too.

Sliding window: windows of ``context`` tokens (default: the model's block size) advance by
``stride`` tokens (default 512); the first window scores all its tokens, each later one only its
last ``stride`` tokens, so every token is scored exactly once with at least ``context - stride``
tokens of context. Two perplexities are reported from the same total negative log-likelihood:
- ``ppl``: divided by the number of WikiText words (whitespace tokens plus one ``<eos>`` per line,
  245,569 for the test file): the paper's normalisation ("per canonical unit");
- ``ppl_token``: divided by the number of GPT-2 BPE tokens scored.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval.common import Pair, all_reduce_sum, format_table, mirror_file, raw_model, score_pairs, shard
from gpt2lab.runtime.dist import print0
from gpt2lab.tokenizer.bpe import Tokenizer

MIRROR_PATH = "wikitext2/wiki.test.tokens"
DEFAULT_STRIDE = 512

# (pattern, replacement), applied in order to each line
_DETOKENIZE = [
    (re.compile(r" @([-,.])@ "), r"\1"),  # number / compound separators: 1 @,@ 000 -> 1,000
    (re.compile(r"= = = ="), "===="),  # heading markers, longest first: = = Career = = -> == Career ==
    (re.compile(r"= = ="), "==="),
    (re.compile(r"= ="), "=="),
    (re.compile(r" ([.,;:!?)\]}])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[{]) "), r"\1"),  # no space after an opening bracket
    (re.compile(r" '(s|t|re|ve|m|ll|d)\b", re.IGNORECASE), r"'\1"),  # it 's -> it's, don 't -> don't
    (re.compile(r"s ' "), "s' "),  # plural possessive: players ' -> players'
    (re.compile(r'"\s*([^"]*?)\s*"'), r'"\1"'),  # " quoted text " -> "quoted text"
]


def detokenize(line: str) -> str:
    """Undo WikiText's tokenization artifacts in one line (see the module docstring)."""
    for pattern, repl in _DETOKENIZE:
        line = pattern.sub(repl, line)
    return line.strip()


def word_count(lines: list[str]) -> int:
    """WikiText's own token count: whitespace tokens plus one <eos> per line (245,569 for test)."""
    return sum(len(line.split()) + 1 for line in lines)


def locate(data: str | Path | None = None) -> Path:
    if data is not None:
        return Path(data)
    path = mirror_file(MIRROR_PATH)
    if path is None:
        raise Gpt2LabError(
            f"no WikiText-2 file: pass --data FILE (wiki.test.tokens) or set GPT2LAB_MIRROR to a folder holding "
            f"{MIRROR_PATH}"
        )
    return path


def read_lines(path: str | Path, limit: int | None = None) -> list[str]:
    """The file's lines (without newlines), the first ``limit`` only if given; empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise Gpt2LabError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise Gpt2LabError(f"{path}: not UTF-8 text ({e})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start another
    if limit is not None:
        lines = lines[:limit]
    if not any(line.strip() for line in lines):
        raise Gpt2LabError(f"{path}: empty file, no text")
    return lines


def windows(ids: list[int], eot: int, context: int, stride: int) -> list[Pair]:
    """(context, scored tokens) per sliding window over <|endoftext|> + ids; each id scored once."""
    if not 1 <= stride <= context:
        raise Gpt2LabError(f"stride must be between 1 and the context length ({context}), got {stride}")
    tokens = [eot] + list(ids)
    pairs, start, done = [], 0, 1  # done: tokens[1:done] are scored already
    while done < len(tokens):
        end = min(start + context + 1, len(tokens))  # inputs tokens[start:end-1]: at most `context`
        pairs.append((tokens[start:done], tokens[done:end]))
        done, start = end, start + stride
    return pairs


def evaluate_ids(
    model: torch.nn.Module,
    ids: list[int],
    eot: int,
    device: str | torch.device,
    context: int | None = None,
    stride: int = DEFAULT_STRIDE,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict:
    """Total NLL and token count of ids under a sliding window, summed over ranks."""
    block_size = raw_model(model).config.block_size
    context = context or block_size
    if context > block_size:
        raise Gpt2LabError(f"context {context} exceeds the model's block size {block_size}")
    if stride > context and rank == 0:  # a window can only advance by its own length; say so, once
        print(f"notice: stride {stride} is longer than the {context}-token window; using stride {context}",
              file=sys.stderr, flush=True)  # fmt: skip
    mine = shard(windows(ids, eot, context, min(stride, context)), rank, world_size)
    sums = {"nll": 0.0, "tokens": 0.0}
    if mine:
        s = score_pairs(model, mine, device, batch_size, progress=progress, desc="wikitext2")
        sums = {"nll": float(s.sum_loss.sum()), "tokens": float(s.n_tokens.sum())}
    return all_reduce_sum(sums, device, world_size) | {"context": context, "stride": min(stride, context)}


def run_wikitext(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    device: str | torch.device,
    data: str | Path | None = None,
    limit: int | None = None,
    context: int | None = None,
    stride: int = DEFAULT_STRIDE,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """The ``eval wikitext2`` command's work: detokenize, score, print a table; returns the results."""
    path = locate(data)
    lines = read_lines(path, limit)
    text = "\n".join(detokenize(line) for line in lines)
    ids = tokenizer.encode_ordinary(text)
    words = word_count(lines)
    print0(f"WikiText-2 file: {path} ({len(lines)} lines, {words} words, {len(ids)} BPE tokens after detokenizing)")
    r = evaluate_ids(model, ids, tokenizer.eot, device, context, stride, batch_size, rank, world_size, rank == 0)
    result = {
        "ppl": math.exp(r["nll"] / words),
        "ppl_token": math.exp(r["nll"] / r["tokens"]),
        "bpb": r["nll"] / math.log(2) / len(text.encode()),  # per UTF-8 byte of the scored text, as per word
        "nll": r["nll"],
        "words": words,
        "tokens": int(r["tokens"]),
        "context": r["context"],
        "stride": r["stride"],
        "file": str(path),
    }
    print0(
        format_table(
            f"WikiText-2 (sliding window: context {result['context']}, stride {result['stride']}; per word and per "
            "byte compare across tokenizers, per token does not)",
            [
                ("ppl (per word)", result["ppl"]),
                ("bits per byte", result["bpb"]),
                ("ppl_token (per BPE token)", result["ppl_token"]),
                ("words", words),
                ("BPE tokens", result["tokens"]),
            ],
        )
    )
    return result
