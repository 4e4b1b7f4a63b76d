"""KV caches for decoding: a preallocated cache for one batch (``KVCache``, static mode for CUDA graphs) and one
whose rows sit at different positions (``BatchKVCache``, continuous batching for a server). The model reads
them through ``prepare`` and ``update``; they are inference machinery, not part of the network."""

from __future__ import annotations

import torch

from gpt2lab.model.config import GPTConfig


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    The buffers are (n_layer, B, heads, max_len, k_dim) and (..., v_dim) with config.kv_cache_dims:
    grouped-query attention caches only its key/value heads; MLA caches its latent as "k" and its
    RoPE key as "v", one of each per token. Two modes compute the same thing:
    - dynamic (default): attention reads only the ``pos`` positions written so far, so each new
      token costs O(context); best in eager mode.
    - static: the position lives in a tensor (``pos_t``) and attention always spans ``max_len``
      keys under a mask, so every decoding step has the same shapes and no Python value changes:
      the step can be captured in a CUDA graph or compiled once.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=None, static=False):
        if max_len > config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {config.block_size}")
        heads, k_dim, v_dim = config.kv_cache_dims
        self.k = torch.zeros((config.n_layer, batch_size, heads, max_len, k_dim), device=device, dtype=dtype)
        self.v = torch.zeros((config.n_layer, batch_size, heads, max_len, v_dim), device=device, dtype=dtype)
        self.max_len = max_len
        self.static = static
        self._pos = 0  # dynamic mode: positions written so far
        self.pos_t = torch.zeros((), dtype=torch.long, device=device)  # static mode: the same, as a tensor
        self._index: torch.Tensor | None = None  # this step's positions (T,)
        self._mask: torch.Tensor | None = None  # this step's attention mask (T, keys), None = attend to all

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes in one sequence: n_layer x heads x (k_dim + v_dim) x element size."""
        per_token = self.k[:, 0, :, 0].numel() + self.v[:, 0, :, 0].numel()  # (n_layer, heads, dim) each
        return per_token * self.k.element_size()

    @property
    def pos(self) -> int:
        """Positions already written (a host sync in static mode: not for the hot loop)."""
        return int(self.pos_t.item()) if self.static else self._pos

    def prepare(self, T: int, device) -> torch.Tensor:
        """Absolute positions (T,) of the next T tokens; fixes this step's attention mask."""
        if self.static:
            self._index = self.pos_t + torch.arange(T, device=device)  # (T,)
            keys = torch.arange(self.max_len, device=device)
            self._mask = keys[None, :] <= self._index[:, None]  # (T, max_len): query i sees keys <= its position
            return self._index
        past = self._pos
        if past + T > self.max_len:
            raise ValueError(f"KV cache full: {past + T} positions > max_len {self.max_len}")
        # one new token sees every cached key; a chunk of T sees keys 0 .. past + i (causal)
        self._mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)
        return torch.arange(past, past + T, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, heads, T, dim) of this step; return (keys, values, mask) to attend over."""
        if self.static:
            self.k[layer].index_copy_(2, self._index, k)
            self.v[layer].index_copy_(2, self._index, v)
            return self.k[layer], self.v[layer], self._mask
        end = self._pos + k.size(2)
        self.k[layer, :, :, self._pos : end] = k
        self.v[layer, :, :, self._pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], self._mask

    def advance(self, T: int) -> None:
        if self.static:
            self.pos_t += T  # in place, so a captured graph sees the new value
        else:
            self._pos += T

    def reset(self) -> None:
        self._pos = 0
        self.pos_t.zero_()


class BatchKVCache:
    """A KV cache of ``slots`` independent sequences, each at its own position: continuous batching.

    Where ``KVCache`` holds one position for the whole batch (every row continues the same prompt),
    row b here holds ``lengths[b]`` tokens of its own sequence. A decoding step feeds one token to
    each of the first ``rows`` slots (the active ones, kept at the front by ``move``), writes it at
    that row's position and lets it attend to its row's keys only, so sequences that started at
    different times decode together in one batch. A sequence enters a slot with ``load`` (its prompt
    prefilled alone in a ``KVCache``). Same buffers and layout as ``KVCache``.
    """

    def __init__(self, config: GPTConfig, slots: int, max_len: int, device=None, dtype=None):
        heads, k_dim, v_dim = config.kv_cache_dims
        self.k = torch.zeros((config.n_layer, slots, heads, max_len, k_dim), device=device, dtype=dtype)
        self.v = torch.zeros((config.n_layer, slots, heads, max_len, v_dim), device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * slots  # tokens held per slot (host ints: no device sync to read them)
        self.rows = 0  # the active slots, 0 .. rows - 1, take part in the next step
        self._index: torch.Tensor | None = None  # this step's write position per active row (rows,)
        self._mask: torch.Tensor | None = None

    def load(self, slot: int, prefilled: KVCache) -> None:
        """Copy a one-sequence cache's tokens into ``slot``."""
        n = prefilled.pos
        if n > self.max_len:
            raise ValueError(f"{n} tokens do not fit the slot's {self.max_len} positions")
        self.k[:, slot, :, :n] = prefilled.k[:, 0, :, :n]
        self.v[:, slot, :, :n] = prefilled.v[:, 0, :, :n]
        self.lengths[slot] = n

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's sequence into slot dst (to keep the active slots at the front)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def prepare(self, T: int, device) -> torch.Tensor:
        """Positions (rows, 1) of each active row's next token; fixes the step's per-row mask."""
        if T != 1:
            raise ValueError("a BatchKVCache step feeds one token per row (prefill each sequence in a KVCache)")
        lengths = self.lengths[: self.rows]
        if max(lengths) >= self.max_len:
            raise ValueError(f"KV cache full: a row holds {max(lengths)} of {self.max_len} positions")
        self._index = torch.tensor(lengths, device=device)  # (rows,)
        keys = torch.arange(max(lengths) + 1, device=device)
        self._mask = (keys[None, :] <= self._index[:, None])[:, None, None, :]  # (rows, 1, 1, keys): own row only
        return self._index[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store each row's k, v (rows, heads, 1, dim) at its position; return its keys, values and mask."""
        rows, keys = torch.arange(self.rows, device=k.device), self._mask.size(-1)
        self.k[layer, rows, :, self._index] = k[:, :, 0]
        self.v[layer, rows, :, self._index] = v[:, :, 0]
        return self.k[layer, : self.rows, :, :keys], self.v[layer, : self.rows, :, :keys], self._mask

    def advance(self, T: int) -> None:
        for b in range(self.rows):
            self.lengths[b] += T
