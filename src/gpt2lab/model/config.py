"""The model's configuration: GPT-2's shape and every [model] switch, checked once (no torch modules here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

# the choices of the [model] switches that pick a module (each module's own table is keyed by these names)
NORMS = ("layernorm", "rmsnorm")
ROPE_SCALINGS = ("none", "linear", "yarn")
MLP_KINDS = ("gelu", "swiglu", "relu2")
ROUTERS = ("softmax", "sigmoid")  # MoE routing: Mixtral/Qwen3-MoE's softmax, DeepSeek-V3's sigmoid


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
    # mixture of experts (gpt2lab.model.moe): routed SwiGLU experts in place of the MLP of the blocks in moe_layers
    n_experts: int = 0  # routed experts per MoE block; 0 = no MoE (every block has the dense MLP)
    experts_per_token: int = 2  # k: routed experts each token goes through (top-k)
    n_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeek, Qwen2-MoE)
    moe_hidden: int | None = None  # hidden width of each expert; None = hidden / (k + n_shared): the dense compute
    moe_layers: str = "all"  # MoE blocks: all | every_other (1, 3, 5, ...) | indices, e.g. "1,2,3"; the rest dense
    moe_router: str = "softmax"  # router scores: softmax (Mixtral, Qwen3-MoE) | sigmoid (DeepSeek-V3)
    moe_norm_topk_prob: bool = True  # renormalise the k gate weights to sum to 1 (Mixtral; norm_topk_prob)
    moe_routed_scaling_factor: float = 1.0  # the k gate weights times this (DeepSeek-V3: 2.5); 1 = unscaled
    moe_n_group: int = 1  # experts in this many equal groups for group-limited routing (DeepSeek-V3: 8); 1 = off
    moe_topk_group: int = 1  # the groups a token may route to: best by their 2 best scores (DeepSeek-V3: 4)
    moe_bias_update_rate: float = 0.001  # DeepSeek-V3's aux-loss-free balancing step (gamma); 0 = off
    moe_aux_loss_coef: float = 0.0  # Switch-style load-balancing loss coefficient (Qwen3-MoE: 0.001); 0 = off

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        choices = {"norm": NORMS, "pos_embedding": ("learned", "rope"), "mlp": MLP_KINDS, "rope_scaling": ROPE_SCALINGS,
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
        if not self.moe_routed_scaling_factor > 0:
            raise ValueError(f"model.moe_routed_scaling_factor must be > 0 (got {self.moe_routed_scaling_factor})")
        self._check_moe_groups()
        self.moe_layer_ids  # noqa: B018 (raises on a bad model.moe_layers)

    def _check_moe_groups(self) -> None:
        """Group-limited routing's rules: equal groups, each with the two experts its score sums, enough experts."""
        groups, kept = self.moe_n_group, self.moe_topk_group
        deepseek = {"moe_n_group": 1, "moe_topk_group": 1, "moe_routed_scaling_factor": 1.0}
        changed = [f"model.{k}={getattr(self, k)}" for k, v in deepseek.items() if getattr(self, k) != v]
        if changed and self.moe_router != "sigmoid":  # so no Qwen3-MoE/Mixtral (softmax) model can carry them
            raise ValueError(f"{', '.join(changed)}: DeepSeek-V3's routing, needs model.moe_router=sigmoid")
        if groups < 1 or self.n_experts % groups:
            raise ValueError(f"model.moe_n_group must divide n_experts ({self.n_experts}) into equal groups "
                             f"(got {groups})")  # fmt: skip
        if not 1 <= kept <= groups:
            raise ValueError(f"model.moe_topk_group must be 1 .. moe_n_group ({groups}), got {kept}")
        per_group = self.n_experts // groups
        if groups > 1 and per_group < 2:  # a group's score is the sum of its two best experts' scores
            raise ValueError(f"model.moe_n_group={groups} leaves {per_group} expert per group; "
                             "group-limited routing needs at least 2")  # fmt: skip
        if self.experts_per_token > kept * per_group:
            raise ValueError(f"model.experts_per_token ({self.experts_per_token}) exceeds the experts of the "
                             f"moe_topk_group={kept} groups a token may use ({kept * per_group})")  # fmt: skip

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
