"""The GPT-2 network, in one readable file.

This is OpenAI's GPT-2 (Radford et al., 2019) as Hugging Face's ``GPT2LMHeadModel``
implements it: learned position embeddings, pre-LayerNorm blocks, a final LayerNorm,
tanh-approximate GELU, biases everywhere, and the token embedding tied to the LM head.
Parameter names are Hugging Face's, so official weights load by name.

Departures from the reference, none of which change the function computed:
- ``nn.Linear`` replaces Hugging Face's ``Conv1D``, so those weights are stored
  transposed (``gpt2lab.hf`` transposes them on the way in and out).
- Attention runs through ``F.scaled_dot_product_attention`` (flash kernels on GPU).
- The vocabulary may be padded (50257 -> 50304) so the LM head matmul has a
  kernel-friendly size; the padded logits are sliced off before anyone sees them.
- ``KVCache`` is a preallocated cache for decoding, so each new token costs O(context); its
  static mode keeps every decoding step the same shape, for CUDA graphs.
- Two training-only switches, set by ``gpt2lab.perf``: ``ce_chunk_size`` (the fused LM head +
  cross-entropy of ``gpt2lab.ops``) and ``activation_checkpointing`` (recompute blocks).

The module holds the network only: no I/O, no training, no tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2lab.ops import linear_cross_entropy


@dataclass
class GPTConfig:
    """Shape of a GPT-2 network. Defaults are GPT-2 124M."""

    block_size: int = 1024  # maximum context length (Hugging Face: n_positions)
    vocab_size: int = 50257  # real vocabulary: ids the tokenizer can produce
    padded_vocab_size: int | None = None  # e.g. 50304; None = no padding
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # for embeddings, attention and residuals; 0 when pretraining
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"padded_vocab_size ({self.padded_vocab_size}) is smaller than vocab_size ({self.vocab_size})"
            )

    @property
    def embedding_rows(self) -> int:
        """Rows of the token embedding / LM head: the padded vocabulary if padded."""
        return self.padded_vocab_size or self.vocab_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """One of the four GPT-2 sizes by name: gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a dict, ignoring keys that are not fields (e.g. from a newer version)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Each buffer is (n_layer, B, n_head, max_len, head_size). Two modes compute the same thing:
    - dynamic (default): attention reads only the ``pos`` positions written so far, so each new
      token costs O(context); best in eager mode.
    - static: the position lives in a tensor (``pos_t``) and attention always spans ``max_len``
      keys under a mask, so every decoding step has the same shapes and no Python value changes:
      the step can be captured in a CUDA graph or compiled once.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=None, static=False):
        if max_len > config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {config.block_size}")
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.static = static
        self._pos = 0  # dynamic mode: positions written so far
        self.pos_t = torch.zeros((), dtype=torch.long, device=device)  # static mode: the same, as a tensor
        self._index: torch.Tensor | None = None  # this step's positions (T,)
        self._mask: torch.Tensor | None = None  # this step's attention mask (T, keys), None = attend to all

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
        """Store k, v (B, nh, T, hs) of this step; return (keys, values, mask) to attend over."""
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # see init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            k, v, mask = kv_cache.update(layer, k, v)  # (B, nh, keys, hs): the cached context too
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh * hs): re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_rows, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.embedding_rows, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        # Rows per chunk for the fused LM head + cross-entropy (gpt2lab.ops) when targets are
        # given; 0 = the plain path. A training switch, not part of the architecture.
        self.ce_chunk_size = 0
        # Recompute each block in the backward pass instead of storing its activations (training only).
        self.activation_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation.

        - Linear and Embedding weights: normal, std 0.02; Linear biases: 0.
        - Residual output projections (attn.c_proj, mlp.c_proj): std 0.02 / sqrt(2 * n_layer),
          so the residual stream's variance does not grow with depth (GPT-2 paper, sec. 2.3).
        - LayerNorm: weight 1, bias 0.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = residual_std if getattr(module, "RESIDUAL_SCALE_INIT", False) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights counted once); by default without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM paper, appendix B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    def forward_hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), after ln_f and before the LM head."""
        B, T = idx.size()
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            pos = kv_cache.prepare(T, idx.device)  # (T,) absolute positions after the cached ones
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, given targets (B, T), the mean cross-entropy.

        Targets equal to -1 are ignored. Padded vocabulary rows never reach the logits,
        so they are never sampled and never enter the loss. With ``ce_chunk_size`` set and
        targets given, the logits are never materialised and None is returned in their place.
        """
        x = self.forward_hidden(idx, kv_cache)
        if targets is not None and self.ce_chunk_size:
            return None, linear_cross_entropy(
                x, self.lm_head.weight, targets, self.config.vocab_size, self.ce_chunk_size
            )
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V): padded rows sliced off
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss
