"""What every benchmark shares: batched scoring of (context, continuation) pairs, ranks, output.

The core is ``score_pairs``: each pair is a context and a continuation (token ids); the model
reads context + continuation and we keep, per pair, the summed cross-entropy over the
continuation tokens only, their count, and whether every continuation token was the model's
argmax prediction (greedy). Pairs are right-padded into one batch with a mask, so several
examples share one forward pass; causal attention means the padding never reaches a real
position. Only the continuation positions go through the LM head (a (N, C) x (C, V) matmul
instead of (B*T, C) x (C, V)), which is the costly part of a small model on short texts.

Departure from build-nanogpt's ``hellaswag.py``: it computes logits for every position and
masks afterwards; the numbers are the same, the work is less.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from gpt2lab.data.sources import iter_jsonl
from gpt2lab.errors import Gpt2LabError
from gpt2lab.mirror import mirror_file as mirror_file  # the evaluations' files in the offline mirror
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import EOT_ID

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclass
class Scores:
    """Per pair, in input order."""

    sum_loss: torch.Tensor  # (N,) float64: cross-entropy summed over the continuation tokens
    n_tokens: torch.Tensor  # (N,) int64: continuation length
    greedy: torch.Tensor  # (N,) bool: every continuation token was the argmax prediction

    @property
    def mean_loss(self) -> torch.Tensor:
        return self.sum_loss / self.n_tokens


def raw_model(model: torch.nn.Module) -> GPT:
    """The plain GPT inside a DDP wrapper (``.module``) and/or ``torch.compile`` (``._orig_mod``)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def autocast(device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU scoring stays float32, exact)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _row(ctx: Sequence[int], cont: Sequence[int], block_size: int) -> list[int]:
    """context + continuation, the context cut from the left so the inputs fit block_size."""
    if not cont:
        raise ValueError("empty continuation: nothing to score")
    if len(cont) > block_size:
        raise Gpt2LabError(f"a continuation of {len(cont)} tokens does not fit the model's context ({block_size})")
    tokens = list(ctx or [EOT_ID]) + list(cont)  # no context: condition on <|endoftext|>, as documents start
    return tokens[-(block_size + 1) :]  # inputs are tokens[:-1], so block_size + 1 tokens fit


@torch.no_grad()
def score_batch(model: GPT, pairs: Sequence[Pair], device: str | torch.device) -> Scores:
    """Score pairs in one forward pass, right-padded with a mask."""
    rows = [_row(ctx, cont, model.config.block_size) for ctx, cont in pairs]
    B, T = len(rows), max(len(r) for r in rows) - 1
    idx = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -1, dtype=torch.long)  # -1: not scored (context or padding)
    for i, ((_, cont), row) in enumerate(zip(pairs, rows)):
        n = len(row) - 1
        idx[i, :n] = torch.tensor(row[:-1])
        targets[i, n - len(cont) : n] = torch.tensor(row[n - len(cont) + 1 :])  # predict row[t + 1] at t
    idx, targets = idx.to(device), targets.to(device)
    mask = targets >= 0  # (B, T)
    with autocast(device):
        hidden = model.forward_hidden(idx)  # (B, T, C)
        logits = model.logits(hidden[mask])  # (N, V): continuation positions only
    logits = logits.float()
    tgt = targets[mask]  # (N,)
    losses = F.cross_entropy(logits, tgt, reduction="none")  # (N,)
    missed = (logits.argmax(-1) != tgt).to(torch.int64)  # (N,)
    row_of = mask.nonzero()[:, 0]  # (N,) which pair each scored position belongs to
    sum_loss = torch.zeros(B, dtype=torch.float64, device=device).index_add_(0, row_of, losses.double())
    n_missed = torch.zeros(B, dtype=torch.int64, device=device).index_add_(0, row_of, missed)
    return Scores(sum_loss.cpu(), mask.sum(1).cpu(), (n_missed == 0).cpu())


def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[Pair],
    device: str | torch.device,
    batch_size: int = 8,
    group: int = 1,
    progress: bool = False,
    desc: str = "scoring",
) -> Scores:
    """Score many pairs, ``batch_size`` groups of ``group`` consecutive pairs per forward pass.

    A group (the 4 endings of one HellaSwag example) always shares a forward pass. Groups are
    sorted longest first, so each batch pads little and an out-of-memory shows at once;
    results come back in input order. The model is put in eval mode and restored afterwards.
    """
    if len(pairs) % group:
        raise ValueError(f"{len(pairs)} pairs do not split into groups of {group}")
    if batch_size < 1:
        raise Gpt2LabError(f"batch size must be at least 1, got {batch_size}")
    net = raw_model(model)
    n_groups = len(pairs) // group
    length = [max(len(c) + len(x) for c, x in pairs[g * group : (g + 1) * group]) for g in range(n_groups)]
    order = sorted(range(n_groups), key=lambda g: -length[g])
    sum_loss = torch.zeros(len(pairs), dtype=torch.float64)
    n_tokens = torch.zeros(len(pairs), dtype=torch.int64)
    greedy = torch.zeros(len(pairs), dtype=torch.bool)
    was_training = net.training
    net.eval()
    try:
        starts = range(0, n_groups, batch_size)
        for s in tqdm(starts, desc=desc, disable=not progress, unit="batch", leave=False):
            idx = [g * group + j for g in order[s : s + batch_size] for j in range(group)]
            scores = score_batch(net, [pairs[i] for i in idx], device)
            sum_loss[idx], n_tokens[idx], greedy[idx] = scores.sum_loss, scores.n_tokens, scores.greedy
    finally:
        net.train(was_training)
    return Scores(sum_loss, n_tokens, greedy)


# ----------------------------------------------------------------------------- ranks


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's share: every world_size-th item, starting at rank."""
    return list(items[rank::world_size])


def all_reduce_sum(values: dict[str, float], device: str | torch.device, world_size: int) -> dict[str, float]:
    """Sum each value over all ranks (no-op for one process); float64 so counts stay exact."""
    if world_size == 1 or not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(values, t.tolist()))


def perplexity(total_loss: float, count: float) -> float:
    return math.exp(total_loss / count) if count else float("nan")


# ----------------------------------------------------------------------------- files and output


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line or an empty file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise Gpt2LabError(f"{path}: no such file")
    rows = list(iter_jsonl(path))
    if not rows:
        raise Gpt2LabError(f"{path}: empty file, no examples")
    return rows


def format_table(title: str, rows: Sequence[tuple[str, object]]) -> str:
    """A two-column table: metric, value (floats with 4 decimals)."""
    cells = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in rows]
    w0 = max(len(k) for k, _ in cells)
    w1 = max(len(v) for _, v in cells)
    rule = "-" * (w0 + w1 + 3)
    lines = [title, rule] + [f"{k:<{w0}}   {v:>{w1}}" for k, v in cells] + [rule]
    return "\n".join(lines)
