"""ShardLoader: DDP coverage, exact resume, seeded shuffle, deterministic validation order, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2lab.data.loader import ShardLoader
from gpt2lab.errors import Gpt2LabError
from tests.data.conftest import make_dataset

T, B = 16, 4


@pytest.fixture(scope="module")
def unique_dataset(tmp_path_factory):
    """Three train shards of distinct token ids, sized to 40, 24 and 16 chunks of T (80 in all)."""
    sizes = [40 * T + 1, 24 * T + 1, 16 * T + 1]
    starts = np.cumsum([0] + sizes)
    shards = [np.arange(starts[i], starts[i] + n) for i, n in enumerate(sizes)]
    val = [np.arange(1000, 1000 + 10 * T + 5)]
    return make_dataset(tmp_path_factory.mktemp("unique"), {"train": shards, "val": val}), shards


def _epoch(loader: ShardLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(loader.next_batch() for _ in range(loader.batches_per_epoch)))
    return torch.cat(xs), torch.cat(ys)  # (n*B, T)


def test_batches_are_shifted_windows(unique_dataset):
    folder, _ = unique_dataset
    x, y = ShardLoader(folder, "train", B, T, seed=3).next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # the tokens are consecutive ids: the window continues


@pytest.mark.parametrize("shuffle", [True, False])
def test_two_ranks_cover_each_token_once_per_epoch(unique_dataset, shuffle):
    folder, shards = unique_dataset
    ranks = [ShardLoader(folder, "train", B, T, rank=r, world_size=2, shuffle=shuffle, seed=7) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 80 // (2 * B)
    every_input = np.sort(np.concatenate([s[:-1] for s in shards]))  # each shard's last token is only a target
    every_target = np.sort(np.concatenate([s[1:] for s in shards]))
    orders = []
    for _ in range(2):  # two epochs: reshuffled, still complete
        (x0, y0), (x1, y1) = _epoch(ranks[0]), _epoch(ranks[1])
        assert not set(x0.flatten().tolist()) & set(x1.flatten().tolist())  # disjoint ranks
        np.testing.assert_array_equal(np.sort(torch.cat([x0, x1]).flatten().numpy()), every_input)
        np.testing.assert_array_equal(np.sort(torch.cat([y0, y1]).flatten().numpy()), every_target)
        orders.append(x0[:, 0].tolist())
    assert (orders[0] != orders[1]) == shuffle  # a new order each epoch, only when shuffling


def test_seeded_shuffle(unique_dataset):
    folder, _ = unique_dataset
    a, b, c = (_epoch(ShardLoader(folder, "train", B, T, seed=s))[0] for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    x, _ = ShardLoader(folder, "train", B, T, shuffle=False).next_batch()
    assert x[:, 0].tolist() == [0, T, 2 * T, 3 * T]  # unshuffled: chunks in file order


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_gives_identical_next_batches(unique_dataset, rank):
    folder, _ = unique_dataset
    kw = dict(world_size=2, seed=11)
    first = ShardLoader(folder, "train", B, T, rank=rank, **kw)
    saver = ShardLoader(folder, "train", B, T, rank=0, **kw)  # a checkpoint keeps rank 0's state
    for _ in range(7):
        first.next_batch(), saver.next_batch()
    state = json.loads(json.dumps(saver.state_dict()))  # through JSON, as in a checkpoint
    resumed = ShardLoader(folder, "train", B, T, rank=rank, **kw)
    resumed.load_state_dict(state)
    for _ in range(2 * first.batches_per_epoch):  # across epoch boundaries
        (xa, ya), (xb, yb) = first.next_batch(), resumed.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_validation_reset_is_deterministic(unique_dataset):
    folder, _ = unique_dataset
    val = ShardLoader(folder, "val", 2, T, shuffle=False)
    assert val.batches_per_epoch == 5  # (10*T + 4) // T = 10 chunks
    first = _epoch(val)[0]
    val.reset()
    assert torch.equal(first, _epoch(val)[0])
    assert first[0, 0].item() == 1000


def test_loader_errors(unique_dataset, tmp_path):
    folder, _ = unique_dataset
    with pytest.raises(Gpt2LabError, match="does not exist"):
        ShardLoader(tmp_path / "nope", "train", B, T)
    with pytest.raises(Gpt2LabError, match="has no manifest.json"):
        ShardLoader(tmp_path, "train", B, T)
    with pytest.raises(Gpt2LabError, match="no 'test' split"):
        ShardLoader(folder, "test", B, T)
    with pytest.raises(Gpt2LabError, match="fewer than one batch"):
        ShardLoader(folder, "val", 64, 1024)
    loader = ShardLoader(folder, "train", B, T)
    other = ShardLoader(folder, "train", B, 8)
    with pytest.raises(Gpt2LabError, match="seq_len"):
        other.load_state_dict(loader.state_dict())


def test_token_id_beyond_vocab_is_refused(tmp_path):
    folder = make_dataset(tmp_path / "d", {"train": [np.full(4 * T + 1, 60000)]})
    loader = ShardLoader(folder, "train", 1, T)
    with pytest.raises(Gpt2LabError, match=r"train_000000\.bin holds token id 60000"):
        loader.next_batch()
