"""`eval loss`: mean token loss over a prepared split, with the training loader's windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gpt2lab.data.shards import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, shard_name, write_json, write_shard
from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval.loss import evaluate_loss
from tests.conftest import assert_close_f32, assert_not_close_f32
from tests.eval.conftest import tiny_gpt


def make_dataset(folder, shards: list[np.ndarray], split: str = "val"):
    """A minimal prepared dataset folder: shards plus a manifest listing them."""
    records = []
    for i, tokens in enumerate(shards):
        name = shard_name(split, i)
        sha = write_shard(folder / name, tokens)
        records.append({"file": name, "tokens": int(tokens.size), "sha256": sha})
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eot": 50256},
        "splits": {split: {"tokens": sum(r["tokens"] for r in records), "shards": records}},
    }
    write_json(folder / MANIFEST, manifest)
    return folder


def test_loss_equals_independent_windows(tmp_path):
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 50257, size=n).astype(np.uint16) for n in (16 * 5 + 3, 16 * 4 + 1)]
    make_dataset(tmp_path, shards)
    model = tiny_gpt()
    T, B = 16, 2
    # reference: each shard cut into chunks of T inputs + 1 target, in order; full batches of B only
    chunks = [s[i * T : (i + 1) * T + 1] for s in shards for i in range((s.size - 1) // T)]
    chunks = chunks[: len(chunks) // B * B]
    with torch.no_grad():
        losses = [model(torch.tensor(c[:-1].astype(np.int64))[None], torch.tensor(c[1:].astype(np.int64))[None])[1]
                  for c in chunks]  # fmt: skip
    expected = float(torch.stack(losses).mean())

    model.train()
    r = evaluate_loss(model, tmp_path, "val", "cpu", batch_size=B, seq_len=T)
    assert model.training  # restored
    assert r["tokens"] == len(chunks) * T == 8 * T
    assert_close_f32(r["loss"], expected)  # batches of 2 against batches of 1: other GEMM shapes, other rounding
    assert_close_f32(math.log(r["ppl"]), expected)
    r2 = evaluate_loss(model, tmp_path, "val", "cpu", batch_size=B, seq_len=T, max_batches=1)
    assert r2["tokens"] == B * T
    assert_close_f32(r2["loss"], float(torch.stack(losses[:B]).mean()))
    assert_not_close_f32(r2["loss"], expected)  # the check bites: the first 2 windows are not all 8


def test_loss_errors(tmp_path):
    model = tiny_gpt(block_size=32)
    with pytest.raises(Gpt2LabError, match="exceeds the model's block size"):
        evaluate_loss(model, tmp_path, "val", "cpu", seq_len=64)
    with pytest.raises(Gpt2LabError, match="does not exist|no manifest"):
        evaluate_loss(model, tmp_path / "nowhere", "val", "cpu", seq_len=16)
