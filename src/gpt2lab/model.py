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
  static mode keeps every decoding step the same shape, for CUDA graphs. ``BatchKVCache`` holds
  sequences at different positions, decoded together (continuous batching, for a server).
- Two training-only switches, set by ``gpt2lab.perf``: ``ce_chunk_size`` (the fused LM head +
  cross-entropy of ``gpt2lab.ops``) and ``activation_checkpointing`` (recompute blocks).
- ``forward(..., doc_ids=)``: rows packing several documents (SFT's conversations) attend within each document
  only, positions restarting per document (``document_mask``); without it, SDPA's plain causal path.

Beyond GPT-2, ``[model]`` switches pick small modules (the defaults are GPT-2's, so a GPT-2 config
builds exactly the network above): ``norm`` (LayerNorm or RMSNorm, Zhang & Sennrich 2019),
``qk_norm`` (RMSNorm on each head's q and k, as in Qwen3/OLMo2), ``pos_embedding`` (learned, or RoPE,
Su et al. 2021, in Llama's half-split layout), ``mlp`` (GELU, SwiGLU as in Llama, or ReLU² as in
modded-nanogpt), ``n_kv_head`` (grouped-query attention, Ainslie et al. 2023; 1 = multi-query),
``attention`` (``mla``: DeepSeek's multi-head latent attention), ``bias`` and
``tie_embeddings``, and ``logit_softcap`` (Gemma 2's final-logit soft cap). Three recipe switches of
modded-nanogpt and nanochat: ``zero_init_proj`` (zero-initialised residual projections, see init_weights),
``x0_skip`` (the embeddings mixed into every block's input through learnable scalars, ``X0Skip``) and
``value_embeddings`` (a token's own vector added to its attention values in every other block).

The module holds the network only: no I/O, no training, no tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2lab import moe
from gpt2lab.moe import ROUTERS, MoE
from gpt2lab.ops import linear_cross_entropy


class MLADims(NamedTuple):
    """Multi-head latent attention's dimensions, resolved (GPTConfig.mla_dims)."""

    kv_lora_rank: int
    q_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


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
    attention: str = "mha"  # mha (multi-head; GQA/MQA through n_kv_head) | mla (DeepSeek's latent attention, below)
    # MLA's dimensions; None = DeepSeek-V2-Lite's proportions (n_embd 2048, hs = n_embd / n_head = 128)
    kv_lora_rank: int | None = None  # the cached key/value latent per token; None = n_embd / 4
    q_lora_rank: int = 0  # the query latent (low-rank q with an RMSNorm); 0 = a plain query projection
    qk_nope_head_dim: int | None = None  # per head: query/key dims without position; None = hs
    qk_rope_head_dim: int | None = None  # query/key dims RoPE rotates (the key's shared by the heads); None = hs/2
    v_head_dim: int | None = None  # per head: value dims; None = hs
    bias: bool = True  # biases in the linear layers and LayerNorms
    tie_embeddings: bool = True  # the LM head shares the token embedding's weight
    logit_softcap: float = 0.0  # final logits squashed to (-c, c) by c tanh(z / c) (Gemma 2, modded-nanogpt); 0 = off
    # recipe switches (modded-nanogpt, nanochat); off = GPT-2
    zero_init_proj: bool = False  # residual output projections start at zero instead of std 0.02 / sqrt(2 n_layer)
    x0_skip: bool = False  # block i reads resid_lambda_i x + x0_lambda_i x0, x0 the embeddings (starts at 1, 0)
    value_embeddings: bool = False  # every other block (the last included) adds a token's own vector to its values
    # mixture of experts (gpt2lab.moe): routed SwiGLU experts in place of the MLP of the blocks in moe_layers
    n_experts: int = 0  # routed experts per MoE block; 0 = no MoE (every block has the dense MLP)
    experts_per_token: int = 2  # k: routed experts each token goes through (top-k)
    n_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeek, Qwen2-MoE)
    moe_hidden: int | None = None  # hidden width of each expert; None = hidden / (k + n_shared): the dense compute
    moe_layers: str = "all"  # MoE blocks: all | every_other (1, 3, 5, ...) | indices, e.g. "1,2,3"; the rest dense
    moe_router: str = "softmax"  # router scores: softmax (Mixtral, Qwen3-MoE) | sigmoid (DeepSeek-V3)
    moe_norm_topk_prob: bool = True  # renormalise the k gate weights to sum to 1 (Mixtral; norm_topk_prob)
    moe_bias_update_rate: float = 0.001  # DeepSeek-V3's aux-loss-free balancing step (gamma); 0 = off
    moe_aux_loss_coef: float = 0.0  # Switch-style load-balancing loss coefficient (Qwen3-MoE: 0.001); 0 = off

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        choices = {"norm": NORMS, "pos_embedding": ("learned", "rope"), "mlp": MLPS, "rope_scaling": ROPE_SCALINGS,
                   "attention": ("mha", "mla")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.rope_scaling != "none" and (self.pos_embedding != "rope" or self.rope_factor < 1):
            raise ValueError("model.rope_scaling needs model.pos_embedding=rope and model.rope_factor >= 1")
        if self.attention == "mla":
            self._check_mla()
        if self.pos_embedding == "rope" and self.rope_dim % 2:
            which = "model.qk_rope_head_dim" if self.attention == "mla" else "n_embd / n_head"
            raise ValueError(f"RoPE needs an even head size ({which} = {self.rope_dim})")
        if self.value_embeddings and self.attention != "mha":
            raise ValueError("model.value_embeddings needs model.attention=mha (MLA caches a latent, not values)")
        if self.logit_softcap < 0:
            raise ValueError(f"model.logit_softcap must be >= 0 (0 = off; got {self.logit_softcap})")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1 (got {self.mlp_hidden})")
        if self.n_experts:
            self._check_moe()
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"padded_vocab_size ({self.padded_vocab_size}) is smaller than vocab_size ({self.vocab_size})"
            )

    def _check_mla(self) -> None:
        """MLA's own rules; each error names the field."""
        if self.pos_embedding != "rope":
            raise ValueError("model.attention=mla needs model.pos_embedding=rope (its decoupled RoPE key)")
        if self.n_kv_head not in (None, self.n_head):
            raise ValueError("model.n_kv_head has no meaning with model.attention=mla (every head reads the one "
                             "cached latent): leave it unset")  # fmt: skip
        if self.qk_norm:
            raise ValueError("model.qk_norm is not defined for model.attention=mla (MLA normalises its latents)")
        dims = self.mla_dims
        for name, value in dims._asdict().items():
            low = 0 if name == "q_lora_rank" else 1  # q_lora_rank 0: a plain query projection
            if value < low:
                raise ValueError(f"model.{name} must be >= {low} (got {value})")
        for name in ("kv_lora_rank", "q_lora_rank"):  # a latent is a linear image of x: wider compresses nothing
            if getattr(dims, name) > self.n_embd:
                raise ValueError(f"model.{name} ({getattr(dims, name)}) must not exceed n_embd ({self.n_embd})")

    def _check_moe(self) -> None:
        """The mixture of experts' rules; each error names the field."""
        if self.n_experts < 0:
            raise ValueError(f"model.n_experts must be >= 0 (got {self.n_experts})")
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(f"model.experts_per_token must be 1 .. n_experts ({self.n_experts}), "
                             f"got {self.experts_per_token}")  # fmt: skip
        if self.moe_router not in ROUTERS:
            raise ValueError(f"model.moe_router must be one of {', '.join(ROUTERS)} (got {self.moe_router!r})")
        for name in ("n_shared_experts", "moe_bias_update_rate", "moe_aux_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0 (got {getattr(self, name)})")
        if self.expert_hidden < 1:
            raise ValueError(f"model.moe_hidden must be >= 1 (got {self.expert_hidden})")
        self.moe_layer_ids  # noqa: B018 (raises on a bad model.moe_layers)

    @property
    def expert_hidden(self) -> int:
        """Hidden width of each expert: moe_hidden, or the dense width shared by the k + shared experts."""
        if self.moe_hidden is not None:
            return self.moe_hidden
        return self.hidden // (self.experts_per_token + self.n_shared_experts)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Indices of the MoE blocks (none without experts)."""
        if not self.n_experts:
            return ()
        if self.moe_layers in ("all", "every_other"):
            return tuple(range(self.moe_layers == "every_other", self.n_layer, 1 + (self.moe_layers == "every_other")))
        try:
            ids = tuple(sorted({int(i) for i in self.moe_layers.split(",")}))
        except ValueError:
            ids = (-1,)
        if not ids or ids[0] < 0 or ids[-1] >= self.n_layer:
            raise ValueError(f"model.moe_layers must be all, every_other or block indices 0 .. {self.n_layer - 1} "
                             f'like "1,3" (got {self.moe_layers!r})')  # fmt: skip
        return ids

    @property
    def value_embedding_layers(self) -> tuple[int, ...]:
        """Blocks with value embeddings: every other one, ending with the last (nanochat); none when off."""
        return tuple(range((self.n_layer - 1) % 2, self.n_layer, 2)) if self.value_embeddings else ()

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mla_dims(self) -> MLADims:
        """MLA's dimensions, the unset ones as in DeepSeek-V2-Lite (512, 128, 64, 128 at n_embd 2048, hs 128)."""
        hs = self.head_size
        return MLADims(
            kv_lora_rank=self.n_embd // 4 if self.kv_lora_rank is None else self.kv_lora_rank,
            q_lora_rank=self.q_lora_rank,
            qk_nope_head_dim=hs if self.qk_nope_head_dim is None else self.qk_nope_head_dim,
            qk_rope_head_dim=hs // 2 if self.qk_rope_head_dim is None else self.qk_rope_head_dim,
            v_head_dim=hs if self.v_head_dim is None else self.v_head_dim,
        )

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: the whole head, or MLA's decoupled RoPE part."""
        return self.mla_dims.qk_rope_head_dim if self.attention == "mla" else self.head_size

    @property
    def head_dims(self) -> tuple[int, int]:
        """(query/key, value) width of each attention head, as attention computes them."""
        if self.attention == "mla":
            dims = self.mla_dims
            return dims.qk_nope_head_dim + dims.qk_rope_head_dim, dims.v_head_dim
        return self.head_size, self.head_size

    @property
    def kv_cache_dims(self) -> tuple[int, int, int]:
        """(heads, k dim, v dim) that KVCache stores per token and layer; MLA: the latent and the shared RoPE key."""
        if self.attention == "mla":
            return 1, self.mla_dims.kv_lora_rank, self.mla_dims.qk_rope_head_dim
        return self.kv_heads, self.head_size, self.head_size

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
    """RoPE's inverse frequencies (rope_dim/2,) and the factor on cos/sin (YaRN's attention temperature).

    linear: every frequency divided by the factor s (position interpolation, Chen et al. 2023).
    yarn (Peng et al. 2023): dimensions that turn many times within the original context keep their
    frequency, slow ones are interpolated by s, a linear ramp in between; cos and sin are scaled by
    0.1 ln s + 1 (the paper's sqrt(1/t), applied to q and k alike). MLA takes that factor in its
    softmax scale instead, as DeepSeek does, since only part of its q and k is rotated: 1 here.
    """
    hs, theta, s = config.rope_dim, config.rope_theta, config.rope_factor
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
    return inv_freq, (1.0 if config.attention == "mla" else yarn_mscale(config))


def yarn_mscale(config: GPTConfig) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln s + 1 on q and k; 1 without YaRN."""
    s = config.rope_factor
    return 0.1 * math.log(s) + 1.0 if config.rope_scaling == "yarn" and s > 1 else 1.0


class Rotary(nn.Module):
    """RoPE (Su et al. 2021): cos and sin of each position's rotation angles, in Llama's half-split layout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config  # read at each call, so a context extension (rope_scaling) applies at once

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # recomputed each call (hs/2 numbers): no buffer to save, or to lose when a model is built on "meta"
        inv_freq, scale = rope_frequencies(self.config, pos.device)
        angles = pos.float()[..., None] * inv_freq  # (T, hs/2), hs = config.rope_dim
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs): the same angle for x_i and x_{i + hs/2}
        if pos.dim() == 2:  # positions per row (B, T) -> (B, 1, T, hs): broadcast over the heads
            angles = angles.unsqueeze(1)
        return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their positions' angles; unchanged without RoPE."""
    if rope is None:
        return x
    cos, sin = rope  # (T, hs) each, or (B, 1, T, hs) with positions per row
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


# ----------------------------------------------------------------------------- DeepSeek's multi-head latent attention
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
#   so ``gpt2lab.hf_deepseek`` permutes those weight rows on the way in and out.
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

    def __init__(self, config: GPTConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or config.hidden  # another width for MoE's shared experts
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)  # Llama's up_proj
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))


MLPS = {"gelu": MLP, "swiglu": SwiGLU, "relu2": ReLU2MLP}


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): every logit within (-cap, cap), nearly unchanged when small; cap 0 = unchanged."""
    return cap * torch.tanh(logits / cap) if cap else logits


def make_attention(config: GPTConfig) -> nn.Module:
    """The attention picked by config.attention: multi-head (GPT-2; GQA/MQA) or multi-head latent (DeepSeek)."""
    return MultiHeadLatentAttention(config) if config.attention == "mla" else CausalSelfAttention(config)


def make_mlp(config: GPTConfig, layer: int) -> nn.Module:
    """The MLP of block `layer`: the dense one picked by config.mlp, or a mixture of experts (gpt2lab.moe)."""
    if layer not in config.moe_layer_ids:
        return MLPS[config.mlp](config)
    shared = config.n_shared_experts * config.expert_hidden
    return MoE(config, SwiGLU(config, shared) if shared else None)


class X0Skip(nn.Module):
    """The embedding skip of modded-nanogpt and nanochat: block i reads resid_lambdas[i] x + x0_lambdas[i] x0.

    x0 is the block stack's input (the embeddings), so every block sees the tokens themselves beside the
    residual stream. Learnable scalars per block, starting at 1 and 0 (init_weights): a fresh model computes
    what GPT-2 computes. (nanochat starts them elsewhere; here the switch alone changes nothing at step 0.)
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))

    def forward(self, x: torch.Tensor, x0: torch.Tensor, layer: int) -> torch.Tensor:
        return self.resid_lambdas[layer] * x + self.x0_lambdas[layer] * x0


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = make_attention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = make_mlp(config, layer)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple | None = None,
        ve: torch.Tensor | None = None,
        doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        values = () if ve is None else (ve,)  # value embeddings, for blocks that have them (multi-head attention)
        x = x + self.attn(self.ln_1(x), kv_cache, layer, rope, *values, doc_mask=doc_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def document_mask(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mask (B, 1, T, T) and positions (B, T) of rows that pack several documents.

    doc_ids (B, T) numbers each token's document; a document's tokens are contiguous in its row. A token
    attends to the earlier tokens of its own document only (causal and same document: block-diagonal), and
    positions restart at 0 with each document, so every document computes exactly what it computes alone.
    """
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, T, T): query i, key j
    pos = mask.sum(-1) - 1  # (B, T): the earlier tokens of its own document
    return mask.unsqueeze(1), pos  # (B, 1, T, T): one mask for every head


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_rows, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=make_norm(config, config.n_embd),
            )
        )
        if config.pos_embedding == "learned":  # GPT-2: a learned vector per position, added to the input
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.rotary = Rotary(config) if config.pos_embedding == "rope" else None  # RoPE: rotates q and k instead
        self.x0_skip = X0Skip(config) if config.x0_skip else None  # the embeddings mixed into every block's input
        # value embeddings (ResFormer; modded-nanogpt, nanochat): a table per block that has them, read by token id;
        # built from zeros, as a random draw here would shift the seed's stream and every other weight with it
        rows, width = config.embedding_rows, config.kv_heads * config.head_size
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(rows, width, _weight=torch.zeros(rows, width)) for i in config.value_embedding_layers}
        )
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
        - MoE's routed experts, as their Linear counterparts: gate_up_proj std 0.02, down_proj residual_std;
          the router's balancing bias: 0.
        - model.zero_init_proj: those residual output projections (MLA's c_proj and the experts' down_proj
          too) 0, so every block starts as the identity (modded-nanogpt, nanochat).
        - model.x0_skip: resid_lambdas 1, x0_lambdas 0.
        - model.value_embeddings: the tables 0, so a fresh model computes GPT-2's values (nanochat starts them
          random behind a gate); the gradient reaches them from the first step.
        """
        # zero_init_proj: drawn from N(0, 0), i.e. exact zeros, with the same random draws as GPT-2's init,
        # so every other weight is the one GPT-2's init gives for the same seed (an ablation changes one thing)
        residual_std = 0.0 if self.config.zero_init_proj else 0.02 / math.sqrt(2 * self.config.n_layer)
        value_tables = set(self.value_embeds.values())
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = residual_std if getattr(module, "RESIDUAL_SCALE_INIT", False) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                if module in value_tables:  # zeros draw nothing: every other weight stays GPT-2's for the seed
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, moe.Experts):
                nn.init.normal_(module.gate_up_proj, mean=0.0, std=0.02)
                nn.init.normal_(module.down_proj, mean=0.0, std=residual_std)
            elif isinstance(module, MoE):
                nn.init.zeros_(module.e_score_correction_bias)
            elif isinstance(module, X0Skip):
                nn.init.ones_(module.resid_lambdas)
                nn.init.zeros_(module.x0_lambdas)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights counted once); by default without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM paper, appendix B).

        6·L·H·(Q_qk + Q_v)·T in general: the scores (Q_qk wide) and the weighted values (Q_v wide),
        which differ under MLA (qk_nope_head_dim + qk_rope_head_dim, v_head_dim).
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params()  # every weight is a matmul but the embeddings (a lookup), unless tied to the head
        if not cfg.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        n -= sum(p.numel() for p in self.value_embeds.parameters())  # lookups too
        n -= sum(m.inactive_params() for m in self.moe_layers())  # MoE: only the k chosen experts compute
        return 6 * n + 6 * cfg.n_layer * cfg.n_head * sum(cfg.head_dims) * T

    def forward_hidden(
        self, idx: torch.Tensor, kv_cache: KVCache | BatchKVCache | None = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), after ln_f and before the LM head.

        ``doc_ids`` (B, T): packed documents (see ``document_mask``); each token sees only its own document.
        """
        B, T = idx.size()
        doc_mask = None
        if doc_ids is not None and kv_cache is not None:
            raise ValueError("doc_ids (packed documents) is for a full forward, not for decoding with a KV cache")
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
            if doc_ids is not None:  # built once for every layer: (B, 1, T, T), and positions (B, T)
                doc_mask, pos = document_mask(doc_ids)
        else:
            pos = kv_cache.prepare(T, idx.device)  # (T,) positions after the cached ones; (B, T): one row each
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        x = x0 = self.transformer.drop(x)
        rope = self.rotary(pos) if self.rotary is not None else None  # (cos, sin), each (T, rope_dim)
        for i, block in enumerate(self.transformer.h):
            if self.x0_skip is not None:
                x = self.x0_skip(x, x0, i)
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None  # (B, T, kv_width)
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, None, i, rope, ve, doc_mask, use_reentrant=False)
            else:
                x = block(x, kv_cache, i, rope, ve, doc_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        if self.training:  # here, after the blocks: a block recomputed in the backward pass is not counted twice
            for m in self.moe_layers():
                m.record_load()
        return self.transformer.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, given targets (B, T), the mean cross-entropy.

        Targets equal to -1 are ignored. Padded vocabulary rows never reach the logits,
        so they are never sampled and never enter the loss. With ``ce_chunk_size`` set and
        targets given, the logits are never materialised and None is returned in their place.
        ``doc_ids`` (B, T): rows of packed documents, each attended to alone (``document_mask``).
        """
        cfg = self.config
        x = self.forward_hidden(idx, kv_cache, doc_ids)
        if targets is not None and self.ce_chunk_size:
            return None, self.with_aux_loss(
                linear_cross_entropy(
                    x, self.lm_head.weight, targets, cfg.vocab_size, self.ce_chunk_size, cfg.logit_softcap
                )  # fmt: skip
            )
        logits = self.logits(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            loss = self.with_aux_loss(loss)
        return logits, loss

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states: (..., vocab_size), padded rows sliced off, soft-capped if set."""
        return softcap(self.lm_head(hidden)[..., : self.config.vocab_size], self.config.logit_softcap)

    # ------------------------------------------------------------------------- mixture of experts (gpt2lab.moe)

    def moe_layers(self) -> list[MoE]:
        """The MoE blocks' MLPs (none for a dense model)."""
        return [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]

    def with_aux_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss plus MoE's auxiliary load-balancing loss when training with model.moe_aux_loss_coef > 0."""
        aux = moe.aux_loss(self.moe_layers()) if self.training else None
        return loss if aux is None else loss + aux

    def update_moe_bias(self) -> None:
        """After each optimizer step: DeepSeek-V3's balancing bias update from the step's expert loads (all ranks)."""
        moe.update_biases(self.moe_layers())

    def moe_stats(self) -> dict:
        """The last step's expert balance, for the metrics: {} for a dense model."""
        return moe.load_stats(self.moe_layers())
