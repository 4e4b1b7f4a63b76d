"""The GPT-2 network, in one readable file.

This is OpenAI's GPT-2 (Radford et al., 2019) as Hugging Face's ``GPT2LMHeadModel``
implements it: learned position embeddings, pre-LayerNorm blocks, a final LayerNorm,
tanh-approximate GELU, biases everywhere, and the token embedding tied to the LM head.
Parameter names are Hugging Face's, so official weights load by name.

Departures from the reference, none of which change the function computed:
- ``nn.Linear`` replaces Hugging Face's ``Conv1D``, so those weights are stored
  transposed (``gpt2lab.interop.hf`` transposes them on the way in and out).
- Attention runs through ``F.scaled_dot_product_attention`` (flash kernels on GPU).
- The vocabulary may be padded (50257 -> 50304) so the LM head matmul has a
  kernel-friendly size; the padded logits are sliced off before anyone sees them.
- ``KVCache`` is a preallocated cache for decoding, so each new token costs O(context); its
  static mode keeps every decoding step the same shape, for CUDA graphs. ``BatchKVCache`` holds
  sequences at different positions, decoded together (continuous batching, for a server).
- Two training-only switches, set by ``gpt2lab.train.perf``: ``ce_chunk_size`` (the fused LM head +
  cross-entropy of ``gpt2lab.model.ops``) and ``activation_checkpointing`` (recompute blocks).
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
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2lab.model.attention import CausalSelfAttention
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.mla import MultiHeadLatentAttention
from gpt2lab.model.mlp import make_mlp
from gpt2lab.model.moe import Experts, MoE, aux_loss, load_stats, update_biases
from gpt2lab.model.ops import linear_cross_entropy
from gpt2lab.model.rope import Rotary

if TYPE_CHECKING:
    from gpt2lab.inference.kv_cache import BatchKVCache, KVCache


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The normalisation picked by config.norm, over the last dim."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(dim, eps=config.layer_norm_epsilon, bias=config.bias)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): every logit within (-cap, cap), nearly unchanged when small; cap 0 = unchanged."""
    return cap * torch.tanh(logits / cap) if cap else logits


def make_attention(config: GPTConfig) -> nn.Module:
    """The attention picked by config.attention: multi-head (GPT-2; GQA/MQA) or multi-head latent (DeepSeek)."""
    return MultiHeadLatentAttention(config) if config.attention == "mla" else CausalSelfAttention(config)


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
        # Rows per chunk for the fused LM head + cross-entropy (gpt2lab.model.ops) when targets are
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
            elif isinstance(module, Experts):
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

    # ------------------------------------------------------------------------- mixture of experts (gpt2lab.model.moe)

    def moe_layers(self) -> list[MoE]:
        """The MoE blocks' MLPs (none for a dense model)."""
        return [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]

    def with_aux_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss plus MoE's auxiliary load-balancing loss when training with model.moe_aux_loss_coef > 0."""
        aux = aux_loss(self.moe_layers()) if self.training else None
        return loss if aux is None else loss + aux

    def update_moe_bias(self) -> None:
        """After each optimizer step: DeepSeek-V3's balancing bias update from the step's expert loads (all ranks)."""
        update_biases(self.moe_layers())

    def moe_stats(self) -> dict:
        """The last step's expert balance, for the metrics: {} for a dense model."""
        return load_stats(self.moe_layers())
