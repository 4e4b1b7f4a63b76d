"""DeepSeek's multi-head latent attention (MLA), a drop-in for ``CausalSelfAttention``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.model.config import GPTConfig
from gpt2lab.model.rope import apply_rope, yarn_mscale

if TYPE_CHECKING:
    from gpt2lab.inference.kv_cache import KVCache

# DeepSeek's multi-head latent attention (MLA; DeepSeek-V2, 2024, sec. 2.1), a drop-in for CausalSelfAttention.
#
# Keys and values come out of one small latent c_kv per token (kv_lora_rank wide, RMS-normalised), and
# positions out of one RoPE key per token shared by every head (qk_rope_head_dim wide), so a KV cache
# holds kv_lora_rank + qk_rope_head_dim numbers per token and layer, not 2 x n_head x head_size:
#
#     q = W_uq RMSNorm(W_dq x)  (or W_q x)        per head: q_nope (qk_nope_head_dim), q_rope (qk_rope_head_dim)
#     c_kv, k_rope = W_dkv x                        RMSNorm(c_kv) (kv_lora_rank), k_rope (one for all heads)
#     k_nope_h, v_h = W_uk_h c_kv, W_uv_h c_kv      W_uk and W_uv are the rows of kv_b_proj
#     score_h = (q_nope_h . k_nope_h + rope(q_rope_h) . rope(k_rope)) / sqrt(qk_nope_head_dim + qk_rope_head_dim)
#
# Two forms compute the same attention:
# - naive (training, a full forward): k and v decompressed for every head, then F.scaled_dot_product_attention;
# - absorbed (decoding with a KVCache, which stores only c_kv and rope(k_rope)): q_nope_h . (W_uk_h c) =
#   (W_uk_h^T q_nope_h) . c, so each query moves into the latent space once and attends over the cached
#   latents themselves; the weighted sum of latents becomes the head's value through W_uv_h at the end.
#
# Parameter names are transformers' DeepseekV3Attention's (q_proj, or q_a_proj + q_a_layernorm + q_b_proj;
# kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj), but for the output projection: c_proj, as in every gpt2lab
# block (o_proj there). Departures from DeepSeek, none of which change the function once weights are converted:
# - RoPE in Llama's half-split layout; DeepSeek's checkpoints pair neighbouring dimensions (rope_interleave),
#   so ``gpt2lab.interop.deepseek`` permutes those weight rows on the way in and out.
# - Biases follow model.bias on the projections of x and on the output (DeepSeek's attention_bias), never on
#   the up-projections out of the latents, as in DeepSeek.
# - YaRN's attention temperature multiplies the softmax scale (squared), as DeepSeek's mscale_all_dim does.

LATENT_NORM_EPS = 1e-6  # DeepSeek's RMSNorm on the q and kv latents keeps its default epsilon, not rms_norm_eps


class MultiHeadLatentAttention(nn.Module):
    """MLA: keys and values from a cached latent, positions from one shared RoPE key (naive and absorbed forms)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        dims = config.mla_dims
        self.config = config  # read at each call: a context extension (rope_scaling) changes the softmax scale
        self.n_head, self.dropout = config.n_head, config.dropout
        self.kv_lora_rank, self.q_lora_rank = dims.kv_lora_rank, dims.q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = (
            dims.qk_nope_head_dim, dims.qk_rope_head_dim, dims.v_head_dim
        )  # fmt: skip
        C, qk_width = config.n_embd, config.n_head * (dims.qk_nope_head_dim + dims.qk_rope_head_dim)
        if dims.q_lora_rank:  # low-rank query: down, RMSNorm, up (DeepSeek-V2/V3)
            self.q_a_proj = nn.Linear(C, dims.q_lora_rank, bias=config.bias)
            self.q_a_layernorm = nn.RMSNorm(dims.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(dims.q_lora_rank, qk_width, bias=False)
        else:  # a plain query projection (DeepSeek-V2-Lite)
            self.q_proj = nn.Linear(C, qk_width, bias=config.bias)
        self.kv_a_proj_with_mqa = nn.Linear(C, dims.kv_lora_rank + dims.qk_rope_head_dim, bias=config.bias)
        self.kv_a_layernorm = nn.RMSNorm(dims.kv_lora_rank, eps=LATENT_NORM_EPS)
        kv_width = config.n_head * (dims.qk_nope_head_dim + dims.v_head_dim)  # every head's k_nope and v
        self.kv_b_proj = nn.Linear(dims.kv_lora_rank, kv_width, bias=False)
        self.c_proj = nn.Linear(config.n_head * dims.v_head_dim, C, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # see GPT.init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple | None = None,
        doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        q = self.query(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, nope + rope)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv).unsqueeze(1)  # (B, 1, T, r): one latent per token, read by every head
        q_rope, k_rope = apply_rope(q_rope, rope), apply_rope(k_rope.unsqueeze(1), rope)  # k_rope (B, 1, T, dr)
        if kv_cache is None:
            y = self.naive(q_nope, q_rope, c_kv, k_rope, doc_mask)
        else:
            y = self.absorbed(q_nope, q_rope, *kv_cache.update(layer, c_kv, k_rope))  # the latents of all positions
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.v_head_dim)  # (B, T, nh * dv): re-assemble heads
        return self.resid_dropout(self.c_proj(y))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's query (B, T, nh * (nope + rope)), through the query latent when q_lora_rank is set."""
        if self.q_lora_rank:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    @property
    def scale(self) -> float:
        """Softmax scale: 1 / sqrt(qk_nope + qk_rope), times YaRN's temperature on q and on k when scaled."""
        return yarn_mscale(self.config) ** 2 / math.sqrt(self.qk_nope_head_dim + self.qk_rope_head_dim)

    def naive(self, q_nope, q_rope, c_kv, k_rope, doc_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Keys and values decompressed per head, then causal attention (training, a full forward): (B, nh, T, dv).

        doc_mask (B, 1, T, T): causal within each packed document instead (GPT.forward_hidden).
        """
        B, _, T, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, nope + dv)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, nh, T, nope + rope)
        k = torch.cat((k_nope, k_rope.expand(-1, self.n_head, -1, -1)), dim=-1)  # every head, the one RoPE key
        dropout_p = self.dropout if self.training else 0.0
        causal = doc_mask is None
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=doc_mask, dropout_p=dropout_p, is_causal=causal, scale=self.scale
        )

    def absorbed(self, q_nope, q_rope, c_kv, k_rope, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over the cached latents (decoding), W_uk absorbed into the query and W_uv applied after.

        c_kv (B, 1, S, r) and k_rope (B, 1, S, dr) hold every cached position; mask (T, S), None = all visible.
        """
        w_uk, w_uv = self.kv_b_proj.weight.view(self.n_head, -1, self.kv_lora_rank).split(
            [self.qk_nope_head_dim, self.v_head_dim], dim=1
        )  # (nh, nope, r), (nh, dv, r)
        q_latent = q_nope @ w_uk  # (B, nh, T, r): q_nope_h . (W_uk_h c) = (W_uk_h^T q_nope_h) . c
        scores = q_latent @ c_kv.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)  # (B, nh, T, S)
        scores = scores * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attn = F.softmax(scores.float(), dim=-1).type_as(scores)
        attn = F.dropout(attn, self.dropout, self.training)
        y_latent = attn @ c_kv  # (B, nh, T, r): each head's weighted sum of latents
        return y_latent @ w_uv.transpose(-1, -2)  # (B, nh, T, dv): W_uv_h once per query, not once per position
