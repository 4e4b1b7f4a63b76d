"""The optimizer and the learning-rate schedule of the GPT-2 recipe.

AdamW with two parameter groups (as in GPT-3 / nanoGPT): weight decay on every tensor of
two or more dimensions (the matmul weights and the embeddings), none on biases and
LayerNorm gains. The schedule is a linear warmup to ``lr`` followed by a cosine decay to
``lr * min_lr_ratio``, then flat. The fused kernel is used where ``gpt2lab.hardware`` says the device has one (CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class OptimConfig:
    """The [optim] section: AdamW and the learning-rate schedule."""

    lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 715  # linear warmup from lr / warmup_steps to lr over this many steps
    decay_steps: int | None = None  # step at which the cosine reaches its minimum; auto (None) = train.max_steps
    weight_decay: float = 0.1  # on 2-D+ tensors only (matmul weights, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    fused: bool | None = None  # fused AdamW kernel; auto (None) = on for CUDA (never where the device lacks it)

    def validate(self) -> list[str]:
        """Problems with these values, as messages naming the key (empty if none)."""
        problems = []
        if self.lr <= 0:
            problems.append(f"optim.lr must be > 0 (got {self.lr})")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"optim.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.warmup_steps < 0:
            problems.append(f"optim.warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.decay_steps is not None and self.decay_steps < 0:
            problems.append(f"optim.decay_steps must be >= 0 (got {self.decay_steps})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"optim.{name} must be in [0, 1) (got {getattr(self, name)})")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            problems.append("optim.weight_decay and optim.grad_clip must be >= 0, optim.eps > 0")
        return problems


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps (so step 0 is not 0);
    then cosine from lr at ``warmup_steps`` to lr * min_lr_ratio at ``decay_steps``; flat after.
    """
    if cfg.decay_steps is None:
        raise ValueError("optim.decay_steps is unresolved (gpt2lab.config sets it to train.max_steps)")
    decay_steps = cfg.decay_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on tensors with dim >= 2, none on biases and LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: OptimConfig, device: str) -> torch.optim.AdamW:
    """AdamW over the decay groups; the fused kernel where the device has one, unless cfg.fused says otherwise."""
    from gpt2lab.hardware import capabilities

    caps = capabilities(device)
    # auto: where the device has the kernel; an explicit true is honoured except on MPS (no fused kernel there)
    fused = caps.fused_adamw if cfg.fused is None else cfg.fused and caps.device_type != "mps"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,  # None lets torch pick foreach on CPU
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
