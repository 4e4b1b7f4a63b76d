"""Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan, 2024), with AdamW for the other parameters.

Muon runs SGD with Nesterov momentum on each weight matrix, then replaces the update by (nearly) the
closest semi-orthogonal matrix, U V^T of its SVD U S V^T, so every direction of the update moves by the
same amount. U V^T is approximated by five steps of a quintic Newton-Schulz iteration (``newton_schulz``),
in bfloat16 on CUDA and float32 elsewhere. References: https://kellerjordan.github.io/posts/muon/, the
KellerJordan/Muon package and modded-nanogpt's records; nanochat uses the same update.

One optimizer holds two kinds of parameter groups (as the Muon package's ``MuonWithAuxAdam``): groups with
``use_muon=True`` (the blocks' matrices) take the Muon update; the others (embeddings, LM head, norms,
biases) take AdamW, the same formula as ``torch.optim.AdamW``. One optimizer, so the training loop, the
float16 gradient scaler and the checkpoints see a plain ``torch.optim.Optimizer``.

Choices, and how they depart from the references:
- Shape scale: modded-nanogpt's and nanochat's ``max(1, rows / cols) ** 0.5`` on the orthogonalised update
  (rows = out features), so ``lr`` is in units of spectral norm per step (~0.02-0.05), not AdamW's units.
  Moonlight's ``0.2 * sqrt(max(rows, cols))`` (Liu et al. 2025, which reuses AdamW's lr) is not used.
- Momentum: the EMA form of the Muon package, ``buf = lerp(buf, g, 1 - m)``; Nesterov: ``lerp(g, buf, m)``.
- Weight decay: decoupled, as AdamW's: ``p *= 1 - lr * weight_decay`` before the update.
- A 3-D parameter (MoE experts, (E, rows, cols)) is a batch of E matrices, each orthogonalised on its own.
- A fused weight (attention's q, k, v in one c_attn; the experts' gate and up) is one matrix by default, its
  shape scale sqrt(3) or sqrt(2); a group with ``split`` (``optim.muon_split``) takes each block of rows on its
  own, scale 1, as nanochat's separate c_q, c_k, c_v are.
- ``momentum`` may be warmed up by the schedule (``optim.muon_momentum_warmup``: modded-nanogpt's 0.85 -> 0.95).
- DDP: the gradients are already all-reduced, so every rank keeps every momentum buffer (cheap, and rank 0's
  state_dict is complete for the checkpoint); the Newton-Schulz work is shared round-robin (matrix i on rank
  i % world_size) and each update is broadcast from its owner, so all ranks apply the identical update.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # a, b, c: the steepest slope at 0 that still keeps values in ~[0.7, 1.2]
NS_STEPS = 5


def newton_schulz(G: Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> Tensor:
    """Approximately U V^T for G = U S V^T (batched over leading dims); singular values land in ~[0.7, 1.2].

    Each step maps X -> a X + b (X X^T) X + c (X X^T)^2 X, i.e. every singular value s -> a s + b s^3 + c s^5,
    leaving U and V alone. G is first divided by its Frobenius norm (>= the spectral norm), so every s <= 1.
    ``dtype``: of the iteration; None = bfloat16 on CUDA (stable here, and fast), float32 elsewhere.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or (torch.bfloat16 if G.device.type == "cuda" else torch.float32))
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # (..., rows <= cols): X X^T is the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT  # (..., r, r)
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def shape_scale(shape: torch.Size) -> float:
    """modded-nanogpt's factor on the orthogonalised update of a (rows, cols) matrix: max(1, rows / cols) ** 0.5."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


def orthogonalise(update: Tensor, steps: int = NS_STEPS, split: tuple[int, ...] | None = None) -> Tensor:
    """The scaled Newton-Schulz update of a matrix; with ``split``, of each block of rows on its own.

    ``split`` lists the rows of the matrices a fused weight stacks (attention's q, k, v; the experts' gate, up),
    as the references that keep them separate (nanochat's c_q, c_k, c_v) orthogonalise them (optim.muon_split).
    """
    if not split:
        return newton_schulz(update, steps).mul_(shape_scale(update.shape))
    if len(set(split)) == 1:  # equal blocks: one batched iteration over (..., blocks, rows, cols)
        blocks = update.unflatten(-2, (len(split), split[0]))
        return newton_schulz(blocks, steps).mul_(shape_scale(blocks.shape)).flatten(-3, -2)
    return torch.cat([orthogonalise(b, steps) for b in update.split(list(split), dim=-2)], dim=-2)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Muon(torch.optim.Optimizer):
    """Muon on the groups with ``use_muon=True``, AdamW on the others (see the module docstring).

    Every group holds all the keys below (missing ones come from the defaults); ``lr`` and ``weight_decay``
    are usually set per group. Muon groups read momentum/nesterov/ns_steps, AdamW groups betas/eps.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas, eps=eps,
            weight_decay=weight_decay, use_muon=True,
        )  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw(group)
        self._muon([group for group in self.param_groups if group["use_muon"]])
        return loss

    def _muon(self, groups: list[dict]) -> None:
        """Momentum everywhere; Newton-Schulz on this rank's share (i % world_size == rank); broadcast; apply."""
        rank, world = _rank_and_world()
        pending = []
        members = [(p, group) for group in groups for p in group["params"] if p.grad is not None]
        for i, (p, group) in enumerate(members):  # the same order on every rank: the model's
            update = self._momentum(p, group)
            owner = i % world
            if owner == rank:
                update = orthogonalise(update, group["ns_steps"], group.get("split")).to(p.dtype).contiguous()
            else:
                update = torch.empty_like(p)  # filled by the owner's broadcast
            work = dist.broadcast(update, src=owner, async_op=True) if world > 1 else None
            pending.append((p, group, update, work))
        for p, group, update, work in pending:
            if work is not None:
                work.wait()
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"])

    def _momentum(self, p: Tensor, group: dict) -> Tensor:
        """buf <- m buf + (1 - m) g; return the Nesterov look-ahead (1 - m) g + m buf (or buf without Nesterov)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf.clone()

    def _adamw(self, group: dict) -> None:
        """torch.optim.AdamW's update (Loshchilov & Hutter 2019), one tensor at a time."""
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
            p.mul_(1 - lr * group["weight_decay"])
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
