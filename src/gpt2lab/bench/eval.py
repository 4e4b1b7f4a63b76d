"""`gpt2lab bench eval`: HellaSwag examples/s, batched against one example or one candidate per forward.

The same examples are scored three ways with the same scorer (``gpt2lab.eval.common.score_pairs``):
one candidate per forward pass (1 row), one example per forward pass (its 4 endings, 4 rows:
build-nanogpt's way), and ``--batch-size`` examples per forward pass (4 x B rows, right-padded,
examples sorted by length). Each mode runs once after one warm-up batch; the per-candidate
losses of the three modes are compared, and the largest difference is printed.
The model is GPT-2 124M with random weights unless ``--model`` names one (speed does not
depend on the weights).
"""

from __future__ import annotations

import argparse
import time

import torch

from gpt2lab.eval.common import score_pairs
from gpt2lab.eval.hellaswag import NUM_ENDINGS, describe, encode, load_examples, locate
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.runtime.dist import default_device
from gpt2lab.tokenizer.bpe import get_tokenizer


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench_eval_command(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    if args.model:
        from gpt2lab.interop.load import load_model

        model = load_model(args.model, device)
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("gpt2")).to(device).eval()
    path = locate(args.data)
    examples = load_examples(path, args.limit)
    pairs = encode(get_tokenizer(), examples)
    n = len(examples)
    print(f"HellaSwag file: {describe(path)}")
    print(f"model {args.model or 'gpt2 124M (random weights)'} on {device}, {n} examples ({len(pairs)} candidates)")

    modes = [
        ("one candidate per forward", 1, 1, 1),  # (name, batch_size, group, rows per forward)
        ("one example per forward", 1, NUM_ENDINGS, NUM_ENDINGS),
        (
            f"batched: {args.batch_size} examples per forward",
            args.batch_size,
            NUM_ENDINGS,
            NUM_ENDINGS * args.batch_size,
        ),
    ]
    score_pairs(model, pairs[: NUM_ENDINGS * args.batch_size], device, args.batch_size, NUM_ENDINGS)  # warm-up
    rows, losses = [], []
    for name, batch_size, group, per_forward in modes:
        _sync(device)
        t0 = time.perf_counter()
        scores = score_pairs(model, pairs, device, batch_size, group, progress=True, desc=name)
        _sync(device)
        seconds = time.perf_counter() - t0
        losses.append(scores.sum_loss)
        rows.append((name, per_forward, seconds, n / seconds))
    base = rows[1][3]  # one example per forward: the reference way
    diff = max(float((x - losses[-1]).abs().max()) for x in losses)

    w = max(len(r[0]) for r in rows)
    print(f"\n{'mode':<{w}}  rows/forward  seconds  examples/s  vs one example")
    for name, per_forward, seconds, rate in rows:
        print(f"{name:<{w}}  {per_forward:>12}  {seconds:>7.2f}  {rate:>10.2f}  {rate / base:>13.2f}x")
    print(f"max |candidate loss difference| between modes: {diff:.2e} (float32 summation order)")
    return 0
