"""Batches of (x, y) token windows from a prepared dataset folder, shuffled per epoch, DDP-sliced, resumable.

How an epoch is laid out (departs from nanoGPT/llm.c, which read shards front to back in a fixed
order and show periodic loss bumps from that ordering):
- each shard of ``n`` tokens is cut into ``(n - 1) // T`` chunks; chunk ``i`` is the input
  ``tokens[i*T : (i+1)*T]`` and the target is the same window shifted by one token, so every token
  is an input once and a target once per epoch (the last token of a chunk is read twice, as the
  next chunk's first input); the ``< T + 1`` tokens at a shard's end are left out;
- with ``shuffle`` the shard order and the chunk order inside each shard are permuted per epoch
  from ``(seed, epoch)`` and ``(seed, epoch, shard)``: the same seed gives the same order;
- the epoch's chunk sequence is cut into global batches of ``B * world_size`` chunks; rank ``r``
  takes chunks ``[r*B, (r+1)*B)`` of each, so ranks are disjoint and together cover every chunk once
  (up to the last partial global batch, which is dropped);
- the state is ``(epoch, batch)``, identical on every rank, so rank 0's ``state_dict()`` restores
  any rank exactly; it also holds ``tokens``, the position as an offset into the epoch's global chunk
  sequence (which does not depend on B or the world size), so a loader with another ``B x world_size``
  resumes at the same place when that offset is a whole number of its global batches (a resume of a
  run on another number of ranks). Only the end of an epoch depends on ``B x world_size``: the last
  partial global batch it drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt2lab.data.shards import open_shard, read_header, read_manifest, split_shards
from gpt2lab.errors import Gpt2LabError
from gpt2lab.runtime.hardware import pin_memory

_MAX_OPEN_SHARDS = 8  # memmaps kept open at once; a batch spans at most a couple of shards


@dataclass
class DataConfig:
    """The [data] section of a training config."""

    path: str = "data/shakespeare"
    """A prepared dataset folder (holds manifest.json), from `gpt2lab data prepare`."""
    shuffle: bool = True
    """Shuffle the shard order and the chunk order within each shard, anew each epoch."""
    seed: int = 1337
    """Seed of that shuffle; the same seed gives the same order of batches."""


class ShardLoader:
    """(x, y) batches of shape (B, T), int64, from one split of a dataset folder."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 1337,
        device: str | torch.device = "cpu",
    ):
        if batch_size < 1 or seq_len < 1:
            raise Gpt2LabError(f"batch size and sequence length must be positive, got B={batch_size}, T={seq_len}")
        if not 0 <= rank < world_size:
            raise Gpt2LabError(f"rank {rank} is not in [0, world_size={world_size})")
        self.data_dir = Path(data_dir)
        self.split, self.B, self.T = split, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.device = torch.device(device)
        manifest = read_manifest(self.data_dir)
        self.vocab_size = int(manifest.get("tokenizer", {}).get("vocab_size", 50257))
        self.files = [self.data_dir / s["file"] for s in split_shards(self.data_dir, manifest, split)]
        self.shard_tokens = np.array(
            [self._checked_size(f, s["tokens"]) for f, s in zip(self.files, manifest["splits"][split]["shards"])],
            dtype=np.int64,
        )
        self.shard_chunks = np.maximum(self.shard_tokens - 1, 0) // self.T
        self.total_tokens = int(self.shard_tokens.sum())
        if self.batches_per_epoch == 0:
            raise Gpt2LabError(
                f"the '{split}' split of {self.data_dir} holds {self.total_tokens:,} tokens, fewer than one batch of "
                f"B={batch_size} x T={seq_len} x {world_size} rank(s); use a smaller batch or sequence length"
            )
        self._open: dict[int, np.memmap] = {}
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, shard order, chunk offsets)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self.epoch, self.batch = 0, 0

    @staticmethod
    def _checked_size(path: Path, listed: int) -> int:
        """The shard's token count from its header, which must agree with the manifest."""
        n = read_header(path)
        if n != listed:
            raise Gpt2LabError(f"{path} holds {n:,} tokens but manifest.json lists {listed:,}; the folder was modified")
        return n

    @property
    def batches_per_epoch(self) -> int:
        """Full batches this rank gets per epoch (the same on every rank)."""
        return int(self.shard_chunks.sum()) // (self.B * self.world_size)

    # ------------------------------------------------------------------------- epoch layout

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard visiting order for an epoch and the first global chunk index of each visited shard."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = len(self.files)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            offsets = np.concatenate([[0], np.cumsum(self.shard_chunks[order])])
            self._epoch_cache = (epoch, order, offsets)
            self._perm_cache.clear()
        return self._epoch_cache[1], self._epoch_cache[2]

    def _chunk_order(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._perm_cache:
            n = int(self.shard_chunks[shard])
            rng = np.random.default_rng([self.seed, epoch, shard])
            self._perm_cache[key] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._perm_cache[key]

    def _tokens(self, shard: int) -> np.memmap:
        if shard not in self._open:
            if len(self._open) >= _MAX_OPEN_SHARDS:
                self._open.pop(next(iter(self._open)))
            self._open[shard] = open_shard(self.files[shard], self.vocab_size)
        return self._open[shard]

    def _read(self, epoch: int, batch: int) -> np.ndarray:
        """This rank's (B, T+1) token windows for one batch of one epoch."""
        order, offsets = self._layout(epoch)
        first = batch * self.B * self.world_size + self.rank * self.B
        out = np.empty((self.B, self.T + 1), dtype=np.uint32)  # uint16 or uint32 shards
        for row, k in enumerate(range(first, first + self.B)):
            pos = int(np.searchsorted(offsets, k, side="right")) - 1  # which visited shard holds chunk k
            shard = int(order[pos])
            start = int(self._chunk_order(epoch, shard)[k - offsets[pos]]) * self.T
            out[row] = self._tokens(shard)[start : start + self.T + 1]
        return out

    # ------------------------------------------------------------------------- public API

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each (B, T) int64 on the device; wraps to a new (reshuffled) epoch."""
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        buf = self._read(self.epoch, self.batch)  # (B, T+1)
        self.batch += 1
        x = torch.from_numpy(buf[:, :-1].astype(np.int64))  # (B, T), contiguous copies
        y = torch.from_numpy(buf[:, 1:].astype(np.int64))
        if pin_memory(self.device):  # pinned host memory lets the copy overlap with compute (gpt2lab.runtime.hardware)
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def reset(self) -> None:
        """Back to the first batch of epoch 0 (for a deterministic validation pass)."""
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict:
        """JSON-serialisable position; the same on every rank."""
        return {
            "split": self.split,
            "epoch": self.epoch,
            "batch": self.batch,
            "tokens": self.batch * self.B * self.world_size * self.T,  # input tokens into the epoch's global stream
            "batch_size": self.B,
            "seq_len": self.T,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "total_tokens": self.total_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader (on any rank, with any B x world_size) stood."""
        mine = self.state_dict()
        for key in ("split", "seq_len", "shuffle", "seed", "total_tokens"):
            if state.get(key) != mine[key]:
                raise Gpt2LabError(
                    f"cannot resume the data loader of {self.data_dir}: saved {key}={state.get(key)!r}, "
                    f"now {mine[key]!r} (an exact resume needs the same data, sequence length and seed)"
                )
        saved = state.get("tokens", int(state["batch"]) * state["batch_size"] * state["world_size"] * self.T)
        per_batch = self.B * self.world_size  # chunks of one global batch
        if int(saved) % (per_batch * self.T):
            raise Gpt2LabError(
                f"cannot resume the data loader of {self.data_dir} with {self.world_size} rank(s) x {self.B} "
                f"sequences: the saved position ({saved:,} tokens into epoch {state['epoch']}) is not a whole "
                f"number of global batches of {per_batch} x {self.T} tokens"
            )
        self.epoch, self.batch = int(state["epoch"]), int(saved) // (per_batch * self.T)


def open_val_loader(
    data_dir: str | Path,
    batch_size: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> tuple[ShardLoader | None, str]:
    """The val split's loader for evaluation during training, or (None, why val loss is unavailable).

    A small corpus may have no val split, or one shorter than a training batch: then the val batch
    is made as large as the split allows (down to one sequence per rank), so it still gets a val loss.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    shards = manifest.get("splits", {}).get("val", {}).get("shards", [])
    if not shards:
        return None, f"{data_dir} has no val split"
    chunks = sum(max(int(s["tokens"]) - 1, 0) // seq_len for s in shards)  # as ShardLoader counts them
    rows = min(batch_size, chunks // world_size)
    if rows == 0:
        tokens = sum(int(s["tokens"]) for s in shards)
        return None, (
            f"the val split of {data_dir} holds {tokens:,} tokens, fewer than one sequence of {seq_len} + 1 "
            f"per rank ({world_size} rank(s))"
        )
    loader = ShardLoader(data_dir, "val", rows, seq_len, rank=rank, world_size=world_size, shuffle=False, device=device)
    note = "" if rows == batch_size else f"val batches of {rows} sequences (the val split is small)"
    return loader, note
