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

    Where ``KVCache`` holds one position for the whole batch (every row continues the same prompt), slot s here
    holds ``lengths[s]`` tokens of its own sequence. Before each forward the engine says which slots take part
    and how many new tokens each brings (``plan``): one each for a decoding step, a chunk of its prompt each for a
    prefill. The forward's input is (rows, T), each row's tokens first and padding after; row i's tokens are
    written at its slot's next positions and attend to that slot's keys only (causally), and the padding is never
    written. Slots 0 .. n-1 in order are read as a slice; any other set of slots is gathered (a prefill, where
    the compute dwarfs the copy). Same buffers and layout as ``KVCache``.
    """

    def __init__(self, config: GPTConfig, slots: int, max_len: int, device=None, dtype=None):
        heads, k_dim, v_dim = config.kv_cache_dims
        self.k = torch.zeros((config.n_layer, slots, heads, max_len, k_dim), device=device, dtype=dtype)
        self.v = torch.zeros((config.n_layer, slots, heads, max_len, v_dim), device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * slots  # tokens held per slot (host ints: no device sync to read them)
        self.slots: list[int] = []  # the next forward's rows: their slots and new-token counts
        self.counts: list[int] = []
        self._read: slice | torch.Tensor = slice(0, 0)
        self._write: tuple[torch.Tensor, ...] = ()
        self._mask: torch.Tensor | None = None
        self._keys = 0

    def plan(self, slots: list[int], counts: list[int]) -> None:
        """The next forward feeds counts[i] new tokens (then padding) to slot slots[i]."""
        for slot, n in zip(slots, counts, strict=True):
            if n < 1 or self.lengths[slot] + n > self.max_len:
                raise ValueError(f"KV cache full: slot {slot} holds {self.lengths[slot]} + {n} of {self.max_len}")
        self.slots, self.counts = list(slots), list(counts)

    def copy(self, src: int, dst: int) -> None:
        """Copy slot src's sequence into slot dst (src keeps it: several choices share one prefilled prompt)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def swap(self, a: int, b: int) -> None:
        """Exchange the sequences of slots a and b."""
        n = max(self.lengths[a], self.lengths[b])
        for buf in (self.k, self.v):
            held = buf[:, a, :, :n].clone()
            buf[:, a, :, :n] = buf[:, b, :, :n]
            buf[:, b, :, :n] = held
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def prepare(self, T: int, device) -> torch.Tensor:
        """Positions (rows, T) of each row's next T inputs; fixes the step's writes and per-row causal mask."""
        if T != max(self.counts):
            raise ValueError(f"the input has {T} tokens per row, the plan {max(self.counts)}")
        starts = torch.tensor([self.lengths[s] for s in self.slots], device=device)  # (rows,)
        pos = starts[:, None] + torch.arange(T, device=device)  # (rows, T); padding runs past the row's tokens
        self._keys = min(self.max_len, max(self.lengths[s] for s in self.slots) + T)
        keys = torch.arange(self._keys, device=device)
        self._mask = (keys <= pos[:, :, None])[:, None]  # (rows, 1, T, keys): its own slot, causally
        rows = [i for i, n in enumerate(self.counts) for _ in range(n)]  # the real tokens, row by row
        steps = [t for n in self.counts for t in range(n)]
        slots = torch.tensor(self.slots, device=device)
        row_t, step_t = torch.tensor(rows, device=device), torch.tensor(steps, device=device)
        self._write = (slots[row_t], starts[row_t] + step_t, row_t, step_t)
        first = self.slots[0]
        contiguous = self.slots == list(range(first, first + len(self.slots)))
        self._read = slice(first, first + len(self.slots)) if contiguous else slots
        return pos.clamp(max=self.max_len - 1)  # padding's positions stay inside the position table

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the rows' real tokens' k, v (rows, heads, T, dim); return their slots' keys, values and mask."""
        slot, position, row, step = self._write
        self.k[layer, slot, :, position] = k[row, :, step]  # (tokens, heads, dim) both sides
        self.v[layer, slot, :, position] = v[row, :, step]
        return self.k[layer, self._read, :, : self._keys], self.v[layer, self._read, :, : self._keys], self._mask

    def advance(self, T: int) -> None:
        for slot, n in zip(self.slots, self.counts):
            self.lengths[slot] += n
