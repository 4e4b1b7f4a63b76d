"""Mean token loss and perplexity of a model over one split of a prepared (sharded) dataset.

The windows are the training loader's (``gpt2lab.data.loader.ShardLoader`` with shuffle off):
non-overlapping chunks of ``seq_len`` inputs, each predicting the same chunk shifted by one,
read in shard order; ranks take disjoint slices and the last partial global batch is dropped.
``seq_len`` defaults to the model's block size, as in training. The mean is over every target
token scored (all batches are full, so it equals the mean of the batch means).

Loss and perplexity are per token, so they compare only models that share a tokenizer; ``bpb`` (bits per
byte: the summed loss in bits over the UTF-8 bytes the scored target tokens stand for, <|endoftext|> counting
none) compares across tokenizers, e.g. a trained 4k tokenizer against GPT-2's on the same text.

Expected results: these depend on the dataset, so none is pinned here. For orientation:
a uniform guess over GPT-2's vocabulary scores ln(50257) = 10.82; a freshly initialised model
scores about 11.0; GPT-2 124M-sized models on web text reach about 3 after ~10B tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval.common import all_reduce_sum, autocast, format_table, raw_model
from gpt2lab.runtime.dist import print0


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    data_dir: str | Path,
    split: str = "val",
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    token_bytes: torch.Tensor | None = None,
) -> dict:
    """Mean loss, perplexity and token count over ``split`` (all of it, or ``max_batches`` per rank);
    with ``token_bytes`` (UTF-8 bytes per token id) also bits per byte."""
    from gpt2lab.data.loader import ShardLoader

    net = raw_model(model)
    seq_len = seq_len or net.config.block_size
    if seq_len > net.config.block_size:
        raise Gpt2LabError(f"--seq-len {seq_len} exceeds the model's block size {net.config.block_size}")
    loader = ShardLoader(
        data_dir, split, batch_size, seq_len, rank=rank, world_size=world_size, shuffle=False, device=device
    )
    n_batches = loader.batches_per_epoch  # the same on every rank, so collectives stay in step
    if max_batches:
        n_batches = min(n_batches, max_batches)
    was_training = net.training
    net.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    if token_bytes is not None:
        token_bytes = token_bytes.to(device)
    try:
        for _ in tqdm(range(n_batches), desc=f"loss ({split})", disable=not progress, unit="batch", leave=False):
            x, y = loader.next_batch()  # (B, T) each
            with autocast(device):
                _, loss = net(x, y)
            total += loss.double() * y.numel()
            if token_bytes is not None:
                nbytes += token_bytes[y].sum()
    finally:
        net.train(was_training)
    counts = {"nll": total.item(), "tokens": float(n_batches * batch_size * seq_len), "bytes": nbytes.item()}
    sums = all_reduce_sum(counts, device, world_size)
    mean = sums["nll"] / sums["tokens"]
    result = {"loss": mean, "ppl": math.exp(mean), "tokens": int(sums["tokens"]), "seq_len": seq_len, "split": split}
    if token_bytes is not None:
        result |= {"bpb": sums["nll"] / math.log(2) / max(sums["bytes"], 1.0), "bytes": int(sums["bytes"])}
    return result


def run_loss(
    model: torch.nn.Module,
    device: str | torch.device,
    data: str | Path,
    split: str = "val",
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """The ``eval loss`` command's work: score the split, print a table; returns the results."""
    from gpt2lab.data.shards import dataset_tokenizer
    from gpt2lab.tokenizer.bpe import token_byte_lengths

    token_bytes = torch.tensor(token_byte_lengths(dataset_tokenizer(data)), dtype=torch.float64)
    result = evaluate_loss(
        model, data, split, device, batch_size, seq_len, max_batches, rank, world_size, rank == 0, token_bytes
    )
    result["data"] = str(data)
    rows = [("loss (per token)", result["loss"]), ("ppl (per token)", result["ppl"])]
    rows += [("bits per byte (across tokenizers)", result["bpb"]), ("tokens", result["tokens"])]
    print0(format_table(f"Loss on {data} [{split}] (windows of {result['seq_len']} tokens, as in training)", rows))
    return result
