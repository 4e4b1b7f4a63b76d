"""Mixture of experts: a drop-in for a Block's MLP (Shazeer et al. 2017; Mixtral, Qwen3-MoE, DeepSeek-V3).

A router (``gate``: n_embd -> n_experts, no bias) scores each token against every expert, by softmax
(Mixtral, Qwen3-MoE) or by sigmoid (DeepSeek-V3). Each token goes through the ``experts_per_token``
(k) routed experts of highest score, whose outputs are summed weighted by their scores; with
``moe_norm_topk_prob`` the k weights are renormalised to sum to 1 (Mixtral always, Qwen3-MoE's and
DeepSeek-V3's ``norm_topk_prob``), then multiplied by ``moe_routed_scaling_factor`` (DeepSeek-V3's
``routed_scaling_factor``, 2.5). DeepSeek-V3's group-limited routing (``moe_n_group`` > 1): the experts sit in
n_group equal groups, each group scored by the sum of its two best (bias-corrected) scores, and a token
chooses its k experts among those of its ``moe_topk_group`` best groups only. ``n_shared_experts`` always-on
experts (DeepSeek, Qwen2-MoE) are one SwiGLU MLP of n_shared_experts x moe_hidden, added for every token.

Routed experts are SwiGLU MLPs without biases, held as 3-D tensors in transformers' own layout
(``Qwen3MoeExperts``): ``gate_up_proj`` (E, 2 x hidden, n_embd), gate rows first, and ``down_proj``
(E, n_embd, hidden). They run batched: the (token, expert) pairs are sorted by expert and each expert
multiplies its slice at once, a loop over experts, never over tokens. That loop reads the group sizes
on the host; a decoding step takes a path without that sync, so it can be a CUDA graph: a few pairs
gather their experts' weights, a captured batch runs every expert on every token (E/k x the FLOPs).

Load balancing, each switched by its config field (0 = off):
- DeepSeek-V3's auxiliary-loss-free balancing (Wang et al. 2024; on by default, γ = 0.001): a per-expert bias
  (``e_score_correction_bias``, transformers' name) is added to the scores for the top-k choice
  only; the gate weights come from the unbiased scores. After each optimizer step ``update_bias``
  moves every bias by ``moe_bias_update_rate`` x sign(mean load - its load), so an overloaded expert
  is chosen less. The bias is a buffer, saved in checkpoints: a resumed run routes as the straight one.
  It stays float32 when the model is cast (bf16 serving): updates of 0.001 vanish in bf16's 8 bits, and
  transformers keeps it float32 too. The training loop skips the update with the step (non-finite loss).
- The classic auxiliary loss (Switch Transformer, eq. 4; transformers' ``load_balancing_loss_func``):
  E x sum_e f_e P_e per MoE block, f_e the fraction of tokens sent to expert e (its k choices counted,
  so the f_e sum to k), P_e its mean router probability (sigmoid scores normalised per token);
  ``moe_aux_loss_coef`` times its mean over the MoE blocks is added to the training loss.
  transformers pools f and P over the layers before the product: the same for one MoE block.

Each block keeps the expert counts of its last forward; ``GPT.forward_hidden`` adds them to the
step's load after the blocks ran, so a block recomputed in the backward pass (activation
checkpointing) is not counted twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from gpt2lab.model.config import GPTConfig


class Experts(nn.Module):
    """The routed experts: E SwiGLU MLPs (no biases) as two 3-D weights, computed batched."""

    def __init__(self, n_experts: int, n_embd: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, n_embd))  # (E, 2H, C): gate, then up
        self.down_proj = nn.Parameter(torch.empty(n_experts, n_embd, hidden))  # (E, C, H)
        # eager under torch.compile: the group sizes change every step, each would recompile. Wrapped here,
        # not by a decorator: torch.compiler.disable imports torch._dynamo, seconds that every import would pay
        self._grouped = torch.compiler.disable(self._grouped)

    def fused_matrices(self) -> list[tuple[nn.Parameter, tuple[int, ...]]]:
        """Weights that stack several matrices, with each one's rows: gate_up_proj holds gate, up (optim.muon_split)."""
        hidden = self.down_proj.size(-1)
        return [(self.gate_up_proj, (hidden, hidden))]

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[n, j] * expert_{chosen[n, j]}(x[n]) for x (N, C), chosen and weights (N, k)."""
        N, k = chosen.shape
        if N * k <= self.gate_up_proj.size(0):  # decoding: gather each pair's weights, no host sync
            return self._gathered(x, chosen, weights)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():  # a CUDA graph of a decoding step: no host sync
            return self._dense(x, chosen, weights)
        return self._grouped(x, chosen, weights)

    def _grouped(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The (token, expert) pairs sorted by expert; each expert multiplies its group at once."""
        k = chosen.size(1)
        expert = chosen.flatten()  # (N*k,) the expert of each (token, choice) pair
        order = expert.argsort(stable=True)  # pairs grouped by expert
        token = order // k  # (N*k,) the token of each pair, in that order
        counts = torch.bincount(expert, minlength=self.gate_up_proj.size(0)).tolist()  # pairs per expert
        outs = [self._expert(e, xs) for e, xs in enumerate(x[token].split(counts)) if counts[e]]
        y = torch.cat(outs) * weights.flatten()[order, None]  # (N*k, C)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # (n, H) each
        return F.linear(F.silu(gate) * up, self.down_proj[e])  # (n, C)

    def _gathered(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate, up = torch.einsum("nc,nkhc->nkh", x, self.gate_up_proj[chosen]).chunk(2, dim=-1)  # (N, k, H)
        y = torch.einsum("nkh,nkch->nkc", F.silu(gate) * up, self.down_proj[chosen])  # (N, k, C)
        return (y * weights[..., None]).sum(1).to(x.dtype)

    def _dense(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighed by the gate weights scattered to (N, E) (zero where not chosen)."""
        gate, up = torch.einsum("nc,ehc->neh", x, self.gate_up_proj).chunk(2, dim=-1)  # (N, E, H)
        y = torch.einsum("neh,ech->nec", F.silu(gate) * up, self.down_proj)  # (N, E, C)
        dense = weights.new_zeros(y.shape[:2]).scatter(1, chosen, weights)  # (N, E)
        return torch.einsum("nec,ne->nc", y, dense.to(y.dtype)).to(x.dtype)


class MoE(nn.Module):
    """A mixture-of-experts MLP: router, k routed SwiGLU experts per token, optional shared experts."""

    def __init__(self, config: GPTConfig, shared_experts: nn.Module | None = None):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.experts_per_token
        self.router, self.norm_topk_prob = config.moe_router, config.moe_norm_topk_prob
        self.routed_scaling_factor = config.moe_routed_scaling_factor
        self.n_group, self.topk_group = config.moe_n_group, config.moe_topk_group
        self.bias_update_rate, self.aux_loss_coef = config.moe_bias_update_rate, config.moe_aux_loss_coef
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = Experts(config.n_experts, config.n_embd, config.expert_hidden)
        self.shared_experts = shared_experts  # a SwiGLU of n_shared_experts x moe_hidden, or None
        # added to the scores to choose the experts, never to weigh them (DeepSeek-V3)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_experts))
        self.dropout = nn.Dropout(config.dropout)
        self.counts: torch.Tensor | None = None  # (E,) pairs per expert in the last forward
        self.aux_loss: torch.Tensor | None = None  # the last training forward's balancing loss (unscaled)
        self.load: torch.Tensor | None = None  # (E,) pairs per expert since the last bias update, this rank
        self.last_load: torch.Tensor | None = None  # (E,) the last step's load, over all ranks

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (N, E), the k chosen experts (N, k) and their gate weights (N, k), for x (N, C)."""
        logits = self.gate(x).float()  # (N, E)
        scores = logits.softmax(dim=-1) if self.router == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias  # (N, E): the bias steers the choice only
        if self.topk_group < self.n_group:
            choice = self.limit_groups(choice)
        chosen = torch.topk(choice, self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, chosen)  # (N, k): from the unbiased scores
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # DeepSeek-V3's epsilon
        return scores, chosen, weights * self.routed_scaling_factor

    def limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (N, E) with -inf outside each token's topk_group best groups, a group scored by its two best."""
        groups = choice.view(choice.size(0), self.n_group, -1)  # (N, G, E/G)
        best = groups.topk(2, dim=-1).values.sum(dim=-1).topk(self.topk_group, dim=-1).indices  # (N, topk_group)
        kept = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return groups.masked_fill(~kept[..., None], float("-inf")).view_as(choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        x = x.reshape(B * T, C)  # (N, C): routing is per token
        scores, chosen, weights = self.route(x)
        flat = chosen.flatten()
        self.counts = flat.new_zeros(self.n_experts).scatter_add_(0, flat, torch.ones_like(flat))  # no host sync
        self.aux_loss = self.balancing_loss(scores, self.counts) if self.training and self.aux_loss_coef else None
        y = self.dropout(self.experts(x, chosen, weights))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)  # with its own dropout
        return y.view(B, T, C)

    def _apply(self, fn, recurse=True):
        """nn.Module's, but a cast leaves the routing bias its float32 values: it only follows the device."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved.dtype != torch.float32:  # cast (bf16, fp16, fp64): the values from before it, never rounded
            self.e_score_correction_bias = bias.to(moved.device, torch.float32)
        return self

    def balancing_loss(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Switch's auxiliary loss E x sum_e f_e P_e (1 x k when perfectly balanced); gradient through P."""
        probs = scores if self.router == "softmax" else scores / scores.sum(dim=-1, keepdim=True)  # (N, E)
        fraction = counts.float() / scores.size(0)  # (E,) tokens routed to each expert, per token
        return self.n_experts * (fraction * probs.mean(dim=0)).sum()

    def record_load(self) -> None:
        """Add the last forward's expert counts to this step's load."""
        self.load = self.counts if self.load is None else self.load + self.counts

    def discard_load(self) -> None:
        """Forget this step's load: the training loop skipped the step, so the bias must not move either."""
        self.load = None

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """DeepSeek-V3's update from a step's load (E,): overloaded experts' bias down, underloaded up."""
        self.last_load, self.load = load, None
        if self.bias_update_rate:
            self.e_score_correction_bias += self.bias_update_rate * torch.sign(load.float().mean() - load)

    def inactive_params(self) -> int:
        """Parameters of the routed experts a token does not go through (not part of its FLOPs)."""
        return (self.n_experts - self.top_k) * self.experts.gate_up_proj[0].numel() * 3 // 2


# ----------------------------------------------------------------------------- the model's MoE blocks together


def aux_loss(moes: list[MoE]) -> torch.Tensor | None:
    """moe_aux_loss_coef x the mean balancing loss of the MoE blocks' last forward; None when off."""
    losses = [m.aux_loss for m in moes if m.aux_loss is not None]
    if not losses:
        return None
    return moes[0].aux_loss_coef * torch.stack(losses).mean()


@torch.no_grad()
def update_biases(moes: list[MoE]) -> None:
    """After an optimizer step: the step's loads summed over the DDP ranks, then every rank's update."""
    if not moes:
        return
    zeros = torch.zeros_like(moes[0].e_score_correction_bias, dtype=torch.long)
    loads = torch.stack([m.load if m.load is not None else zeros for m in moes])  # (L_moe, E)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads)  # the same sum on every rank, so the biases stay identical
    for moe, load in zip(moes, loads, strict=True):
        moe.update_bias(load)


def load_stats(moes: list[MoE]) -> dict:
    """The last step's balance for metrics.jsonl: max/mean load (mean over MoE blocks) and each block's shares."""
    loads = [m.last_load for m in moes if m.last_load is not None]
    if not loads:
        return {}
    loads = torch.stack(loads).double()  # (L_moe, E)
    ratio = loads.max(dim=1).values / loads.mean(dim=1).clamp_min(1e-9)
    shares = (loads / loads.sum(dim=1, keepdim=True).clamp_min(1)).round(decimals=4)
    return {"moe_load_max_over_mean": ratio.mean().item(), "moe_load": shares.tolist()}
