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

Beyond GPT-2, ``[model]`` switches pick small modules (the defaults are GPT-2's, so a GPT-2 config
builds exactly the network above): ``norm`` (LayerNorm or RMSNorm, Zhang & Sennrich 2019),
``qk_norm`` (RMSNorm on each head's q and k, as in Qwen3/OLMo2), ``pos_embedding`` (learned, or RoPE,
Su et al. 2021, in Llama's half-split layout), ``mlp`` (GELU, SwiGLU as in Llama, or ReLU² as in
modded-nanogpt), ``n_kv_head`` (grouped-query attention, Ainslie et al. 2023; 1 = multi-query),
``bias`` and ``tie_embeddings``.

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
    layer_norm_epsilon: float = 1e-5  # epsilon of every norm (LayerNorm or RMSNorm)
    # beyond GPT-2: each switch picks a module (see the table in README.md); the defaults are GPT-2's
    norm: str = "layernorm"  # layernorm | rmsnorm
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention (Qwen3, OLMo2)
    pos_embedding: str = "learned"  # learned (GPT-2's wpe) | rope
    rope_theta: float = 10000.0  # RoPE base: frequencies theta^(-2i/head_size)
    rope_scaling: str = "none"  # none | linear (position interpolation) | yarn: to run past the trained context
    rope_factor: float = 1.0  # context extension factor s of linear/YaRN scaling
    rope_original_context: int | None = None  # the context RoPE was trained at; None = block_size
    mlp: str = "gelu"  # gelu | swiglu | relu2
    mlp_hidden: int | None = None  # hidden width of the MLP; None = 4 x n_embd
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head, 1 = multi-query
    bias: bool = True  # biases in the linear layers and LayerNorms
    tie_embeddings: bool = True  # the LM head shares the token embedding's weight

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        choices = {"norm": NORMS, "pos_embedding": ("learned", "rope"), "mlp": MLPS, "rope_scaling": ROPE_SCALINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.rope_scaling != "none" and (self.pos_embedding != "rope" or self.rope_factor < 1):
            raise ValueError("model.rope_scaling needs model.pos_embedding=rope and model.rope_factor >= 1")
        if self.pos_embedding == "rope" and self.head_size % 2:
            raise ValueError(f"RoPE needs an even head size (n_embd / n_head = {self.head_size})")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1 (got {self.mlp_hidden})")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"padded_vocab_size ({self.padded_vocab_size}) is smaller than vocab_size ({self.vocab_size})"
            )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is not set (plain multi-head attention)."""
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        """Hidden width of the MLP."""
        return self.mlp_hidden or 4 * self.n_embd

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

    Each buffer is (n_layer, B, kv_heads, max_len, head_size): grouped-query attention caches
    only its key/value heads. Two modes compute the same thing:
    - dynamic (default): attention reads only the ``pos`` positions written so far, so each new
      token costs O(context); best in eager mode.
    - static: the position lives in a tensor (``pos_t``) and attention always spans ``max_len``
      keys under a mask, so every decoding step has the same shapes and no Python value changes:
      the step can be captured in a CUDA graph or compiled once.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=None, static=False):
        if max_len > config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {config.block_size}")
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_size)
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


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The normalisation picked by config.norm, over the last dim."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(dim, eps=config.layer_norm_epsilon, bias=config.bias)


NORMS = ("layernorm", "rmsnorm")


ROPE_SCALINGS = ("none", "linear", "yarn")
# YaRN's ramp: dimensions turning over 32 times in the original context keep their frequency, under once interpolate
YARN_BETA_FAST, YARN_BETA_SLOW = 32, 1


def rope_frequencies(config: GPTConfig, device=None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (head_size/2,) and the factor on cos/sin (YaRN's attention temperature).

    linear: every frequency divided by the factor s (position interpolation, Chen et al. 2023).
    yarn (Peng et al. 2023): dimensions that turn many times within the original context keep their
    frequency, slow ones are interpolated by s, a linear ramp in between; cos and sin are scaled by
    0.1 ln s + 1 (the paper's sqrt(1/t), applied to q and k alike).
    """
    hs, theta, s = config.head_size, config.rope_theta, config.rope_factor
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)  # (hs/2,)
    if config.rope_scaling == "linear":
        return inv_freq / s, 1.0
    if config.rope_scaling == "none":
        return inv_freq, 1.0
    original = config.rope_original_context or config.block_size

    def dim_turning(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times in `original`
        return hs * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_turning(YARN_BETA_FAST)), 0)
    high = min(math.ceil(dim_turning(YARN_BETA_SLOW)), hs - 1)
    ramp = ((torch.arange(hs // 2, device=device, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + inv_freq / s * ramp  # ramp 0: extrapolate (keep), 1: interpolate
    return inv_freq, (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)


class Rotary(nn.Module):
    """RoPE (Su et al. 2021): cos and sin of each position's rotation angles, in Llama's half-split layout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config  # read at each call, so a context extension (rope_scaling) applies at once

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # recomputed each call (hs/2 numbers): no buffer to save, or to lose when a model is built on "meta"
        inv_freq, scale = rope_frequencies(self.config, pos.device)
        angles = pos.float()[:, None] * inv_freq[None, :]  # (T, hs/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs): the same angle for x_i and x_{i + hs/2}
        return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their positions' angles; unchanged without RoPE."""
    if rope is None:
        return x
    cos, sin = rope  # (T, hs) each
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # the pair (x_i, x_{i + hs/2}) turned by 90 degrees
    return (x.float() * cos + rotated.float() * sin).type_as(x)


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

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0, rope: tuple | None = None
    ) -> torch.Tensor:
        B, T, C = x.size()
        kv_width = self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_size)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_size)).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        dropout_p = self.dropout if self.training else 0.0
        mask = None
        if kv_cache is not None:
            k, v, mask = kv_cache.update(layer, k, v)  # (B, n_kv, keys, hs): the cached context too
        if self.n_kv_head != self.n_head:  # grouped-query attention: each k/v head serves n_head / n_kv_head queries
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh * hs): re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP: Linear, tanh-approximate GELU, Linear."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class ReLU2MLP(MLP):
    """ReLU squared instead of GELU (So et al. 2021; modded-nanogpt, nanochat)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.relu(self.c_fc(x)).square()))


class SwiGLU(nn.Module):
    """Llama's MLP (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_gate = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, config.hidden, bias=config.bias)  # Llama's up_proj
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))


MLPS = {"gelu": MLP, "swiglu": SwiGLU, "relu2": ReLU2MLP}


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLPS[config.mlp](config)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0, rope: tuple | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_rows, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=make_norm(config, config.n_embd),
            )
        )
        if config.pos_embedding == "learned":  # GPT-2: a learned vector per position, added to the input
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.rotary = Rotary(config) if config.pos_embedding == "rope" else None  # RoPE: rotates q and k instead
        self.lm_head = nn.Linear(config.n_embd, config.embedding_rows, bias=False)
        if config.tie_embeddings:
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
        - LayerNorm: weight 1, bias 0; RMSNorm: weight 1.
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
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights counted once); by default without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM paper, appendix B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params()  # every weight is a matmul but the embeddings (a lookup), unless tied to the head
        if not cfg.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    def forward_hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), after ln_f and before the LM head."""
        B, T = idx.size()
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            pos = kv_cache.prepare(T, idx.device)  # (T,) absolute positions after the cached ones
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        rope = self.rotary(pos) if self.rotary is not None else None  # (cos, sin), each (T, head_size)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, None, i, rope, use_reentrant=False)
            else:
                x = block(x, kv_cache, i, rope)
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
