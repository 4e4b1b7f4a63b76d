"""GRPO-style policy gradient: group-relative advantages and the token-level policy loss.

For a prompt, G completions are sampled from the current policy and each gets a reward from the task's
verifier. A completion's advantage is its reward minus its group's mean (Shao et al. 2024, DeepSeekMath),
optionally divided by the group's standard deviation (``rl.std_normalize``; Dr. GRPO, Liu et al. 2025,
argues the division biases toward easy and hard prompts). Every token of the completion carries that
advantage, and the loss is

    L = - sum over completion tokens t of  A_t * min(r_t, clip(r_t, 1 - eps, 1 + eps)) / N

(PPO's clipped surrogate, r_t = pi(token) / pi_old(token), the min taken of the products with A_t), over N,
the completion tokens of the whole step (all micro-batches and ranks: ``train.masked_weights``). On-policy
with one update per batch (``rl.epochs = 1``, the default as in nanochat), pi_old is pi, r_t = 1 and the
gradient is exactly A_t * grad log pi(token_t): REINFORCE with a group baseline. With ``rl.kl > 0`` the
k3 estimator of KL(pi || pi_ref) to the frozen starting policy is added per token (Schulman 2020).
A group whose rewards are all equal has advantage 0 everywhere: no gradient, only counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """Advantages (P, G) of rewards (P prompts, G completions each): reward - group mean [/ (group std + eps)]."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centred


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target) per position (B, T), 0 where the target is -1 (float32)."""
    logp = -F.cross_entropy(logits.float().flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none").view_as(
        targets
    )
    return logp.masked_fill(targets == -1, 0.0)


def policy_loss(
    logp: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    clip: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    kl: float = 0.0,
) -> torch.Tensor:
    """The clipped policy-gradient loss averaged over this micro-batch's completion tokens (targets != -1).

    logp, old_logp, ref_logp, advantages: (B, T), per target position. old_logp None: on-policy (ratio 1).
    """
    mask = (targets != -1).float()
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    per_token = -surrogate
    if kl and ref_logp is not None:
        delta = ref_logp - logp  # k3 = e^delta - delta - 1 >= 0, an unbiased estimate of KL(pi || pi_ref)
        per_token = per_token + kl * (torch.exp(delta) - delta - 1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean entropy (nats) of the policy over the completion positions: how far it still explores."""
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        h = -(logp.exp() * logp).sum(-1)  # (B, T)
        mask = targets != -1
        return float(h[mask].mean()) if mask.any() else 0.0
