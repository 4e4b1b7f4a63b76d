"""The KL penalty and PPO's ratio against exact values: the k3 estimator's direction and epochs > 1."""

from __future__ import annotations

import math

import torch

from gpt2lab.rl.grpo import policy_loss, token_logprobs
from gpt2lab.rl.objective import RLObjective
from gpt2lab.rl.rollout import RLConfig


def _k3(logp: float, ref_logp: float, kl: float = 1.0) -> torch.Tensor:
    """The KL penalty alone (advantage 0) of one trained token, through policy_loss."""
    logp_t = torch.tensor([[logp]], requires_grad=True)
    loss = policy_loss(logp_t, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), None, 0.2,
                       torch.tensor([[ref_logp]]), kl)  # fmt: skip
    return loss, logp_t


def test_k3_on_known_numbers_is_exp_r_minus_r_minus_1_with_r_log_ref_over_pi():
    # pi(token) = 1/2, pi_ref(token) = 1/4: r = log(1/4 / 1/2) = -log 2, k3 = 1/2 + log 2 - 1
    loss, logp = _k3(math.log(0.5), math.log(0.25), kl=0.5)
    assert math.isclose(loss.item(), 0.5 * (math.log(2) - 0.5), rel_tol=1e-6)
    loss.backward()  # d/dlogpi of kl * (pi_ref/pi - log(pi_ref/pi) - 1) = kl * (1 - pi_ref/pi)
    assert math.isclose(logp.grad.item(), 0.5 * (1 - 0.5), rel_tol=1e-6)


def test_k3_averaged_under_the_policy_is_the_exact_kl_to_the_reference():
    """E_{x ~ pi}[k3(x)] = KL(pi || pi_ref) = sum_x pi(x) log(pi(x) / pi_ref(x)), over a small vocabulary."""
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(6), torch.randn(6)
    pi, ref = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    exact = float((pi.exp() * (pi - ref)).sum())
    per_token = [_k3(float(pi[x]), float(ref[x]))[0].item() for x in range(6)]
    expected = sum(math.exp(pi[x]) * per_token[x] for x in range(6))
    assert exact > 0.05 and math.isclose(expected, exact, rel_tol=1e-5)
    # and the penalty's gradient lowers log pi where pi > pi_ref (descent moves pi toward the reference)
    for x in range(6):
        loss, logp = _k3(float(pi[x]), float(ref[x]))
        loss.backward()
        assert math.isclose(logp.grad.item(), 1 - math.exp(ref[x] - pi[x]), rel_tol=1e-5, abs_tol=1e-7)
        assert (logp.grad.item() > 0) == (pi[x] > ref[x])


class _Logits(torch.nn.Module):
    """A "model" whose logits are its parameters, whatever the input: its log-probabilities are known."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits, None


def test_the_second_epoch_on_a_batch_uses_the_ratio_to_the_policy_that_sampled_it():
    torch.manual_seed(0)
    model = _Logits(torch.randn(2, 2, 4))  # 2 completions, 2 positions, vocabulary of 4
    targets = torch.tensor([[1, 3], [0, -1]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    objective = RLObjective(RLConfig(epochs=2, clip=0.2))
    memo: dict = {}
    batch = (torch.zeros(2, 2, dtype=torch.long), None, adv, memo)
    first = objective.loss(model, batch, targets)
    old = token_logprobs(model.logits.detach(), targets)
    assert torch.isclose(first, torch.tensor(-1 / 3))  # epoch 1: ratio 1, the loss is -mean(A) = -(1 + 1 - 1) / 3
    with torch.no_grad():  # the optimizer's step between the epochs, known: target logits up by 0.5 and 0.05
        model.logits[0, 0, 1] += 0.5
        model.logits[0, 1, 3] += 0.05
        model.logits[1, 0, 0] += 0.5
    second = objective.loss(model, batch, targets)
    second.backward()
    ratio = torch.exp(token_logprobs(model.logits.detach(), targets) - old)
    assert ratio[0, 0] > 1.2 and 1 < ratio[0, 1] < 1.2 and ratio[1, 0] > 1.2  # one inside the trust region
    # PPO-clip by hand: A > 0 takes min(r, 1.2) * A; A < 0 takes min(r * A, 1.2 * A) = r * A (r > 1.2)
    hand = -(1.2 * 1 + ratio[0, 1] * 1 + ratio[1, 0] * -1) / 3
    assert torch.isclose(second, hand)
    # the gradient: 0 on the clipped token; on the others -A * r * (onehot - softmax) / 3
    p = torch.softmax(model.logits.detach(), -1)
    assert torch.equal(model.logits.grad[0, 0], torch.zeros(4))
    for (b, t), a in (((0, 1), 1.0), ((1, 0), -1.0)):
        onehot = torch.nn.functional.one_hot(targets[b, t], 4).float()
        expected = -a * ratio[b, t] * (onehot - p[b, t]) / 3
        assert torch.allclose(model.logits.grad[b, t], expected, atol=1e-6)
