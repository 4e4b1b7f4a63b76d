"""RL's objective for the training loop: the policy-gradient loss on on-policy rollouts.

The rollouts come from ``gpt2lab.rl.rollout.RolloutLoader`` (which only samples and rewards). This objective
owns the rest of a step: the policy loss (``gpt2lab.rl.grpo``: PPO's clipped ratio when rl.epochs > 1, the KL
penalty to the frozen starting policy when rl.kl > 0, that reference model loaded here), its entropy, and every
``rl.eval_every`` rollouts the held-out evaluation: greedy accuracy on ``rl.eval_problems`` test problems
(``eval_reward``; with ``rl.eval_samples`` also the sampled ``eval_sampled_reward``), the learning curve
`gpt2lab plot` draws. The loop averages the loss over the step's completion tokens (``masked``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2lab.eval.common import all_reduce_sum
from gpt2lab.rl.grpo import entropy, policy_loss, token_logprobs
from gpt2lab.rl.rollout import RLConfig, RolloutLoader
from gpt2lab.train.objective import Objective


class RLObjective(Objective):
    """Train a policy on a task's rewards: the [rl] section's rollouts, policy loss and held-out evaluation."""

    masked = True  # the loop averages the loss over the step's trained (completion) tokens

    def __init__(self, rl: RLConfig):
        self.rl = rl
        self.loader: RolloutLoader | None = None
        self.val_loader = None  # no val loss: the held-out rewards instead
        self.reference = None  # rl.kl > 0: the frozen starting policy
        self.entropies: list[float] = []
        self.held_out: dict = {}  # the latest held-out evaluation not yet logged
        self.trained: list[int] = []  # positions each micro-batch's forward computed (rows x padded length)

    def init_weights(self, raw_model) -> None:
        from gpt2lab.chat.base import load_base_weights

        load_base_weights(raw_model, self.rl.model)

    def open(self, cfg, raw_model, info, resume_from: Path | None) -> None:
        from gpt2lab.interop import tokenizer_match

        tok = tokenizer_match.run_tokenizer(cfg, resume_from)
        self.loader = RolloutLoader(
            raw_model, tok, self.rl, cfg.train.micro_batch, info.rank, info.world_size, cfg.train.seed,
            before_rollout=self._evaluate_if_due,
        )  # fmt: skip
        if self.rl.kl > 0:  # the frozen starting policy the KL penalty keeps it near (read again on a resume)
            from gpt2lab.interop.load import load_model

            param = next(raw_model.parameters())
            self.reference = load_model(self.rl.model, param.device, param.dtype).requires_grad_(False)

    def loss(self, model, batch: tuple, targets: torch.Tensor) -> torch.Tensor:
        """The policy loss of a micro-batch (mean over its completion tokens)."""
        x, _, adv, memo = batch
        self.trained.append(x.numel())
        logits, _ = model(x)
        logp = token_logprobs(logits, targets)
        if self.rl.epochs > 1 and "old_logp" not in memo:  # its first epoch: the policy that sampled it
            memo["old_logp"] = logp.detach()
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = token_logprobs(self.reference(x)[0], targets)
        self.entropies.append(entropy(logits, targets))
        return policy_loss(logp, targets, adv, memo.get("old_logp"), self.rl.clip, ref, self.rl.kl)

    def stats(self) -> dict:
        """The steps' rollout metrics, entropy and held-out rewards, then cleared; every rank calls it (an
        all-reduce)."""
        out, self.held_out = self.held_out | self.loader.stats(), {}
        if self.entropies:
            out["entropy"], self.entropies = sum(self.entropies) / len(self.entropies), []
        world_size = self.loader.world_size
        if world_size > 1:  # every rank sampled an equal share: the step's figure is the mean of theirs
            local = {k: out[k] for k in sorted(out) if not k.startswith("eval_")}  # evaluations span all ranks already
            summed = all_reduce_sum(local, next(self.loader.model.parameters()).device, world_size)
            out |= {k: v / world_size for k, v in summed.items()}
        if out.get("rollout_s"):  # all ranks' sampled and prefilled tokens per second of (mean) rollout time
            out["rollout_tokens_per_s"] = out["rollout_tokens"] * world_size / out["rollout_s"]
        return out

    def step_tokens(self, total_batch: int, seconds: float) -> tuple[float, float]:
        """(positions the last step's micro-batches trained on, its seconds less its rollout's): a step computes
        its rows' padded lengths, not train.total_batch, and spends most of its time sampling (``stats`` has the
        rollout's own tokens/s)."""
        loader, steps = self.loader, self.loader.per_rollout
        tokens = float(sum(self.trained[-steps:]))
        self.trained = []
        if loader.world_size > 1:
            tokens = all_reduce_sum({"t": tokens}, next(loader.model.parameters()).device, loader.world_size)["t"]
        rolled = loader.rollout_at >= loader.served - steps  # the step sampled a rollout (not a later PPO epoch)
        return tokens, max(seconds - (loader.rollout_seconds if rolled else 0.0), 1e-9)

    def _evaluate_if_due(self, index: int) -> None:
        if self.rl.eval_every and index % self.rl.eval_every == 0:
            self.held_out |= self.evaluate()

    def evaluate(self) -> dict:
        """On the first rl.eval_problems test problems (split over the ranks, summed): greedy pass@1
        (eval_reward) and, with rl.eval_samples, the share right of that many samples each at the rollout
        temperature (eval_sampled_reward: the policy's own mean reward, what RL raises first)."""
        from gpt2lab.eval.generative import evaluate

        rl, loader = self.rl, self.loader
        result = evaluate(
            loader.model, loader.tok, loader.task, "test", max(rl.eval_samples, 1), rl.eval_problems,
            temperature=rl.temperature, max_new_tokens=rl.max_new_tokens, seed=loader.seed, rank=loader.rank,
            world_size=loader.world_size,
        )  # fmt: skip
        out = {"eval_reward": result["pass@1"]}
        if rl.eval_samples:
            out["eval_sampled_reward"] = result["sampled_pass@1"]
        return out
