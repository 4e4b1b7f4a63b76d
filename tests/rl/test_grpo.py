"""GRPO's pieces against hand computations: group advantages, the policy loss and its gradient."""

from __future__ import annotations

import torch

from gpt2lab.rl.grpo import group_advantages, policy_loss, token_logprobs


def test_advantages_are_rewards_minus_the_group_mean_optionally_over_its_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    assert adv.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]
    scaled = group_advantages(rewards, std_normalize=True, eps=0.0)
    std = (3 * 0.25**2 + 0.75**2) / 4  # population variance of the third group
    assert torch.allclose(scaled[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / std**0.5)
    assert torch.equal(group_advantages(rewards, std_normalize=True)[1], torch.zeros(4))  # all equal: no NaN


def _setup():
    """Two groups of two completions, logits as parameters: the gradient is known in closed form."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, requires_grad=True)  # 4 completions, 3 positions, vocabulary of 5
    targets = torch.tensor([[-1, 2, 4], [-1, 0, -1], [-1, 1, 3], [-1, 4, 4]])  # -1: prompt or padding
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # group 2: all equal
    adv = group_advantages(rewards).flatten()[:, None].expand(4, 3)
    return logits, targets, adv


def test_the_loss_and_its_gradient_equal_the_formula():
    logits, targets, adv = _setup()
    loss = policy_loss(token_logprobs(logits, targets), targets, adv)
    loss.backward()
    mask = targets != -1
    n = mask.sum()
    assert torch.isclose(loss, -(adv * mask).sum() / n)  # on-policy: ratio 1, so the value is -mean(A)
    # d/dlogits of -A log softmax(logits)[target] / n = -A (onehot - softmax) / n, at trained positions only
    p = torch.softmax(logits.detach(), -1)
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), 5).float()
    expected = (-(adv * mask)[..., None] * (onehot - p)) / n
    assert torch.allclose(logits.grad, expected, atol=1e-7)
    assert torch.equal(logits.grad[2:], torch.zeros_like(logits.grad[2:]))  # the all-equal group: no gradient


def test_the_clipped_ratio_stops_the_gradient_past_the_trust_region():
    logits, targets, adv = _setup()
    logp = token_logprobs(logits, targets)
    old = (logp - 0.5).detach()  # the policy moved: ratio e^0.5 = 1.65 > 1.2 everywhere
    policy_loss(logp, targets, adv, old_logp=old, clip=0.2).backward()
    assert torch.equal(logits.grad[0], torch.zeros_like(logits.grad[0]))  # A > 0 and ratio > 1 + eps: clipped
    assert logits.grad[1].abs().sum() > 0  # A < 0: the unclipped (smaller) surrogate keeps its gradient


def test_the_kl_penalty_is_zero_at_the_reference_and_positive_away_from_it():
    logits, targets, adv = _setup()
    logp = token_logprobs(logits, targets)
    base = policy_loss(logp, targets, torch.zeros_like(adv))
    assert policy_loss(logp, targets, torch.zeros_like(adv), ref_logp=logp.detach(), kl=0.1) == base
    assert policy_loss(logp, targets, torch.zeros_like(adv), ref_logp=logp.detach() - 1, kl=0.1) > base
