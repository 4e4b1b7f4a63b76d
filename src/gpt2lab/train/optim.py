"""The optimizer and the learning-rate schedule of the GPT-2 recipe, and Muon as the alternative.

AdamW with two parameter groups (as in GPT-3 / nanoGPT): weight decay on every tensor of
two or more dimensions (the matmul weights and the embeddings), none on biases and
LayerNorm gains. The schedule is a linear warmup to ``lr`` followed by a cosine decay to
``lr * min_lr_ratio``, then flat. The fused kernel is used where ``runtime/hardware.py`` says the device has one (CUDA).

``name = "muon"``: the blocks' weight matrices (and MoE experts' matrices) go to Muon (``gpt2lab.train.muon``) at
``muon_lr``; the embeddings, the LM head, norms and biases stay with AdamW at ``lr``. ``schedule = "wsd"``:
warmup-stable-decay (MiniCPM, Hu et al. 2024; Hägele et al. 2024), a linear decay over the last
``decay_fraction`` of ``decay_steps`` instead of the cosine. The schedule scales every group's base lr alike.
Three Muon choices of the references, off by default: ``muon_split`` (q, k, v orthogonalised one by one),
``muon_momentum_warmup`` (0.85 -> 0.95, modded-nanogpt) and ``muon_router = false`` (the MoE router on AdamW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from gpt2lab.model.moe import MoE

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


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
    name: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW at lr for the rest)
    muon_lr: float = 0.02  # Muon's peak lr, in spectral norm per step (modded-nanogpt: 0.02-0.05)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay: p *= 1 - muon_lr * muon_weight_decay
    muon_split: bool = False  # Muon takes a fused weight's matrices (q, k, v; gate, up) one by one, as nanochat's
    muon_momentum_warmup: int = 0  # steps for the momentum to rise from muon_momentum_start (modded-nanogpt: 300)
    muon_momentum_start: float = 0.85  # modded-nanogpt's start
    muon_router: bool = True  # the MoE router's weight on Muon (as the block's other matrices); false = on AdamW
    schedule: str = "cosine"  # cosine | wsd (warmup, stable at lr, linear decay over the last decay_fraction)
    decay_fraction: float = 0.2  # wsd: the share of decay_steps spent decaying

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
        for name, allowed in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                problems.append(f"optim.{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.muon_lr <= 0:
            problems.append(f"optim.muon_lr must be > 0 (got {self.muon_lr})")
        if not 0 <= self.muon_momentum < 1:
            problems.append(f"optim.muon_momentum must be in [0, 1) (got {self.muon_momentum})")
        if self.muon_momentum_warmup < 0 or not 0 <= self.muon_momentum_start < 1:
            problems.append("optim.muon_momentum_warmup must be >= 0 and optim.muon_momentum_start in [0, 1) "
                            f"(got {self.muon_momentum_warmup}, {self.muon_momentum_start})")  # fmt: skip
        if self.muon_weight_decay < 0:
            problems.append(f"optim.muon_weight_decay must be >= 0 (got {self.muon_weight_decay})")
        if not 0 < self.decay_fraction <= 1:
            problems.append(f"optim.decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        return problems


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps (so step 0 is not 0);
    then cosine from lr at ``warmup_steps`` to lr * min_lr_ratio at ``decay_steps``; flat after.
    With ``schedule = "wsd"`` the cosine is replaced by ``wsd_lr``.
    """
    if cfg.decay_steps is None:
        raise ValueError("optim.decay_steps is unresolved (gpt2lab.config sets it to train.max_steps)")
    decay_steps = cfg.decay_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return min_lr
    if cfg.schedule == "wsd":
        return wsd_lr(step, cfg)
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def wsd_lr(step: int, cfg: OptimConfig) -> float:
    """Warmup-stable-decay after the warmup (MiniCPM, Hu et al. 2024; Hägele et al. 2024): lr until the last
    ``decay_fraction`` of ``decay_steps`` (never before the warmup ends), then linear to lr * min_lr_ratio."""
    decay_start = max(cfg.warmup_steps, cfg.decay_steps - round(cfg.decay_fraction * cfg.decay_steps))
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, cfg.decay_steps - decay_start)  # 0 -> 1
    return cfg.lr - progress * (cfg.lr - cfg.lr * cfg.min_lr_ratio)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on tensors with dim >= 2, none on biases and LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Muon for the matrices (2-D and MoE's 3-D) inside the blocks, embeddings excepted; AdamW for the rest.

    The Muon groups carry ``lr_scale = muon_lr / lr``, so ``set_lr`` moves both kinds of groups along one
    schedule. The AdamW groups are ``param_groups``' (decay on 2-D+, none on 1-D). With ``muon_split``, the
    fused weights (``fused_matrices()`` of attention and experts) form one more Muon group per row layout, its
    ``split`` naming the rows of each matrix; with ``muon_router = false`` the routers join AdamW's groups.
    """
    not_muon = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if not cfg.muon_router:
        not_muon |= {id(m.gate.weight) for m in model.modules() if isinstance(m, MoE)}
    splits = {id(p): rows for m in model.modules() if hasattr(m, "fused_matrices") for p, rows in m.fused_matrices()}
    muon: dict[tuple[int, ...] | None, list] = {None: []}  # split -> params
    rest = []
    for name, p in model.named_parameters():  # tied weights appear once (as transformer.wte.weight)
        if not p.requires_grad:
            continue
        if name.startswith("transformer.h.") and p.dim() >= 2 and id(p) not in not_muon:
            muon.setdefault(splits.get(id(p)) if cfg.muon_split else None, []).append(p)
        else:
            rest.append(p)
    base = dict(use_muon=True, lr=cfg.muon_lr, lr_scale=cfg.muon_lr / cfg.lr, momentum=cfg.muon_momentum,
                weight_decay=cfg.muon_weight_decay)  # fmt: skip
    groups = [dict(base, params=ps, **({"split": split} if split else {})) for split, ps in muon.items()]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    adamw = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    groups += [dict(g, use_muon=False, lr=cfg.lr) for g in adamw]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: OptimConfig, device: str) -> torch.optim.Optimizer:
    """AdamW over the decay groups; the fused kernel where the device has one, unless cfg.fused says otherwise.

    With ``cfg.name = "muon"``: one ``gpt2lab.train.muon.Muon`` holding the Muon group and the AdamW groups."""
    from gpt2lab.runtime.hardware import capabilities

    if cfg.name == "muon":
        from gpt2lab.train.muon import Muon

        return Muon(muon_param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)

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


def muon_momentum_at(step: int, cfg: OptimConfig) -> float:
    """Muon's momentum at ``step``: linear from muon_momentum_start to muon_momentum over the warmup, then flat."""
    if step >= cfg.muon_momentum_warmup:
        return cfg.muon_momentum
    frac = step / cfg.muon_momentum_warmup
    return cfg.muon_momentum_start + frac * (cfg.muon_momentum - cfg.muon_momentum_start)


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig) -> float:
    """Step ``step``'s learning rate into every group (``set_lr``) and momentum into Muon's; returns the lr."""
    lr = lr_at(step, cfg)
    set_lr(optimizer, lr)
    for group in optimizer.param_groups:
        if group.get("use_muon"):
            group["momentum"] = muon_momentum_at(step, cfg)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr (AdamW's) into every group; Muon's group gets it times its lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
