"""GPT-2's causal self-attention, with its [model] switches: grouped-query attention (``n_kv_head``; Ainslie et al.
2023), RoPE, QK-norm (Qwen3/OLMo2) and value embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.model.config import GPTConfig
from gpt2lab.model.rope import apply_rope

if TYPE_CHECKING:  # the caches are inference's; the model only calls their update()
    from gpt2lab.inference.kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        kv_width = self.n_kv_head * self.head_size
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # see init_weights
        self.resid_dropout = nn.Dropout(config.dropout)
        qk_norm = config.qk_norm  # RMSNorm over each head's q and k (Qwen3); identity for GPT-2
        self.q_norm = nn.RMSNorm(self.head_size, eps=config.layer_norm_epsilon) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_size, eps=config.layer_norm_epsilon) if qk_norm else nn.Identity()

    def fused_matrices(self) -> list[tuple[nn.Parameter, tuple[int, ...]]]:
        """Weights that stack several matrices, with each one's rows: c_attn holds q, k and v (optim.muon_split)."""
        kv_width = self.n_kv_head * self.head_size
        return [(self.c_attn.weight, (self.n_head * self.head_size, kv_width, kv_width))]

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple | None = None,
        ve: torch.Tensor | None = None,
        doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        kv_width = self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)
        if ve is not None:  # value embeddings (B, T, kv_width): the tokens' own vectors added to their values
            v = v + ve
        q = self.q_norm(q.view(B, T, self.n_head, self.head_size)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_size)).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        dropout_p = self.dropout if self.training else 0.0
        mask = doc_mask  # (B, 1, T, T): causal within each packed document (GPT.forward_hidden), or None
        if kv_cache is not None:
            k, v, mask = kv_cache.update(layer, k, v)  # (B, n_kv, keys, hs): the cached context too
        if self.n_kv_head != self.n_head:  # grouped-query attention: each k/v head serves n_head / n_kv_head queries
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if kv_cache is None and mask is None:  # plain causal: the fast kernels (flash) take no mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh * hs): re-assemble heads
        return self.resid_dropout(self.c_proj(y))
