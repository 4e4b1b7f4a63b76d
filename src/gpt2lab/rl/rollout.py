"""The [rl] section and the loader of `gpt2lab rl`: on-policy rollouts, rewarded and batched.

RL's objective (``gpt2lab.rl.objective``) opens a ``RolloutLoader`` for the training loop. At the first micro-batch
of a step the loader samples ``rl.group_size`` completions for each of its prompts from the current policy (the
model being trained, in eval mode: every prompt x G sequences of the step in one ``gpt2lab.inference.engine`` batch,
each group's prompt prefilled once, bfloat16 autocast on CUDA), rewards them with the task's
verifier, turns rewards into group-relative advantages (``gpt2lab.rl.grpo``) and serves the step's micro-batches:
prompt + completion rows whose targets are the completion's tokens (the prompt's are -1) and whose weights are the
advantages. The objective averages the loss over the step's trained tokens (all micro-batches and ranks) and its
``loss`` is the policy loss in place of cross-entropy.

Every rank samples its own share of the step's prompts, each group on one rank (so a group's mean is a local mean).
The sampling seed of each completion is a function of (train.seed, rollout index, prompt index, sample index): a
resumed run samples exactly what the uninterrupted one did, with nothing else to save than the loader's step.
Tokens a tool forced (the calculator's output) are never trained: their targets are -1. The loader only samples:
before each rollout it calls ``before_rollout(index)`` (the objective's held-out evaluation, the reference model and
the policy loss live in ``gpt2lab.rl.objective``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt2lab.chat.template import render_prompt, split_reply
from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.engine import Engine, Sequence
from gpt2lab.inference.tools import Calculator
from gpt2lab.rl.arith import ARITH_DIGITS
from gpt2lab.rl.grpo import group_advantages


@dataclass
class RLConfig:
    """The [rl] section: the policy trained, its task, and how completions are sampled and weighed."""

    model: str = ""  # the starting policy: a chat model (a gpt2lab sft run, checkpoint or export); "" = no RL
    task: str = ""  # gsm8k, arith, or a JSONL of prompts and answers (gpt2lab.rl.tasks)
    digits: int = ARITH_DIGITS  # arith: digits per operand (the difficulty knob)
    ops: str = "+"  # arith: the operations drawn from, e.g. "+*"
    verifier: str = ""  # a JSONL task: module:function(reply, answer) -> float; "" = exact match
    group_size: int = 8  # completions sampled per prompt (G)
    prompts_per_step: int = 8  # prompts per optimizer step, over all ranks
    max_new_tokens: int = 128  # longest completion (never past the context)
    temperature: float = 1.0  # sampling temperature of the rollouts (1 = the policy itself)
    top_k: int = 0  # 0 = sample from the whole vocabulary
    std_normalize: bool = False  # divide advantages by the group's std (GRPO) or not (Dr. GRPO)
    epochs: int = 1  # optimizer steps on each rollout batch; > 1 uses PPO's clipped ratio (resume exactly at a
    # checkpoint whose step is a multiple of epochs: inside a cycle the batch is sampled again, by the newer policy)
    clip: float = 0.2  # PPO's epsilon (only matters when epochs > 1)
    kl: float = 0.0  # weight of the KL penalty to the starting policy (0 = none, as nanochat and DAPO)
    eval_every: int = 25  # rollouts between held-out greedy evaluations (0 = never)
    eval_problems: int = 64  # held-out test problems per evaluation
    eval_samples: int = 0  # >= 2: also the policy's mean reward there, from that many samples each at rl.temperature
    lr: float = 1e-5  # the RL schedule replaces [optim]'s: constant after warmup (small steps keep the policy near)
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0

    def validate(self) -> list[str]:
        problems = []
        if self.task and not self.model:
            problems.append("rl.model is empty: name the policy to train (gpt2lab rl --model ...)")
        if self.group_size < 2:
            problems.append(f"rl.group_size must be >= 2: a group of one has no baseline (got {self.group_size})")
        if self.prompts_per_step < 1 or self.max_new_tokens < 1 or self.epochs < 1:
            problems.append("rl.prompts_per_step, rl.max_new_tokens and rl.epochs must be >= 1")
        if not self.temperature > 0:
            problems.append(f"rl.temperature must be > 0: rollouts sample (got {self.temperature})")
        if self.top_k < 0 or self.kl < 0 or not 0 < self.clip < 1 or self.eval_every < 0:
            problems.append("rl.top_k, rl.kl and rl.eval_every must be >= 0, rl.clip in (0, 1)")
        if self.eval_samples < 0 or self.eval_samples == 1:
            problems.append(f"rl.eval_samples must be 0 (greedy only) or >= 2 (got {self.eval_samples})")
        if self.lr <= 0 or not 0 <= self.warmup_fraction <= 1 or self.weight_decay < 0:
            problems.append("rl.lr must be > 0, rl.warmup_fraction in [0, 1], rl.weight_decay >= 0")
        return problems


def make_task(rl: RLConfig):
    from gpt2lab.rl.tasks import get_task

    options = {"digits": rl.digits, "ops": rl.ops} if rl.task == "arith" else {}
    if rl.verifier:
        options["verifier"] = rl.verifier
    return get_task(rl.task, **options)


def _seed(*parts: int) -> int:
    return random.Random(":".join(map(str, parts))).getrandbits(63)  # stable across processes (not hash())


class RolloutLoader:
    """Micro-batches of rewarded on-policy completions, ``micro_batch`` rows each."""

    def __init__(
        self, model, tokenizer, rl: RLConfig, micro_batch: int, rank: int, world_size: int, seed: int,
        before_rollout: Callable[[int], None] | None = None,
    ):  # fmt: skip
        self.before_rollout = before_rollout  # called with each rollout's index, the policy in eval mode
        self.model, self.tok, self.rl = model, tokenizer, rl
        self.task = make_task(rl)
        self.problems = self.task.problems("train")
        if not self.problems:
            raise Gpt2LabError(f"rl.task {rl.task}: no training problems")
        if rl.prompts_per_step % world_size or (rl.prompts_per_step // world_size * rl.group_size) % micro_batch:
            raise Gpt2LabError(
                f"rl.prompts_per_step ({rl.prompts_per_step}) x rl.group_size ({rl.group_size}) must split evenly "
                f"into {world_size} ranks x micro-batches of {micro_batch} rows"
            )
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.end = tokenizer.special_id("<|assistant_end|>")
        self.think = tokenizer.special_id("<think>"), tokenizer.special_id("</think>")
        self.served = 0  # micro-batches served so far: the loader's whole state
        self.tool = Calculator(tokenizer)  # a policy that calls the calculator gets its answers
        self.rollout_at, self.rollout_seconds, self.rollout_tokens = -1, 0.0, 0  # the last rollout (throughput)
        self.queue: list[tuple] = []
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its shuffled order of the problems)
        self.metrics: dict = {}

    @property
    def per_rollout(self) -> int:
        """Micro-batches one rollout makes on this rank (the step's grad-accumulation count)."""
        return self.rl.prompts_per_step // self.world_size * self.rl.group_size // self.micro_batch

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = int(state["served"])
        self.queue = []

    def stats(self) -> dict:
        """This rank's rollout metrics since the last call (reward, lengths, ...), then cleared."""
        out, self.metrics = self.metrics, {}
        return out

    def next_batch(self) -> tuple:
        """(x, y, advantages, memo) of the next micro-batch: rows (B, L), targets -1 off the completions."""
        if not self.queue:
            batches = self.per_rollout * self.rl.epochs
            index = self.served // batches  # the rollout this micro-batch belongs to
            rollout = self._rollout(index)
            skip = self.served - index * batches  # resumed inside a rollout's epochs: same batches, same order
            self.queue = (rollout * self.rl.epochs)[skip:]
        self.served += 1
        return self.queue.pop(0)

    # ------------------------------------------------------------------ rollouts

    def _problem(self, index: int):
        """The index-th training problem of an endless sequence of shuffled epochs."""
        n = len(self.problems)
        if self._order[0] != index // n:  # shuffled once per epoch (7 ms for arith's problems)
            order = list(range(n))
            random.Random(_seed(self.seed, index // n)).shuffle(order)
            self._order = (index // n, order)
        return self.problems[self._order[1][index % n]]

    def _prompt(self, problem) -> list[int]:
        prompt = render_prompt(problem.messages, self.tok)
        if len(prompt) >= self.model.config.block_size:
            raise Gpt2LabError(f"rl: a prompt of {len(prompt)} tokens fills the model's context")
        return prompt

    def _sample(self, prompts: list[list[int]], seeds: list[list[int]]) -> list[Sequence]:
        """Every prompt's completions (one per seed), decoded together; each ``Sequence.tokens`` stops before
        <|assistant_end|> (``last`` is -1 when it ended there)."""
        block, rl = self.model.config.block_size, self.rl
        seqs = [
            Sequence(prompt, min(rl.max_new_tokens, block - len(prompt)), temperature=rl.temperature,
                     top_k=rl.top_k or None, seed=seed, end_ids=frozenset({self.end}), tool=self.tool)
            for prompt, group in zip(prompts, seeds) for seed in group
        ]  # fmt: skip
        longest = max(len(p) for p in prompts) + rl.max_new_tokens
        param = next(self.model.parameters())
        engine = Engine(self.model, max_batch=len(seqs), max_len=longest, autocast=param.device.type == "cuda")
        start = time.perf_counter()
        engine.run(seqs)
        self.rollout_seconds = time.perf_counter() - start
        self.rollout_tokens = engine.prompt_tokens + engine.generated_tokens
        return seqs

    def _rollout(self, index: int) -> list[dict]:
        rl, G = self.rl, self.rl.group_size
        per_rank = rl.prompts_per_step // self.world_size
        was_training = self.model.training
        self.model.eval()
        if self.before_rollout is not None:  # RL's objective: the held-out evaluation every rl.eval_every rollouts
            self.before_rollout(index)
        indices = [index * rl.prompts_per_step + self.rank * per_rank + p for p in range(per_rank)]
        problems = [self._problem(j) for j in indices]
        prompts = [self._prompt(p) for p in problems]
        seqs = self._sample(prompts, [[_seed(self.seed, index, j, g) for g in range(G)] for j in indices])
        self.rollout_at = self.served
        rows, rewards, lengths, thinking = [], [], [], []
        for n, seq in enumerate(seqs):
            ids = seq.tokens + ([self.end] if seq.last == -1 else [])  # it ended: train its <|assistant_end|>
            reasoning, answer = split_reply(ids, self.tok)
            rewards.append(float(self.task.reward(answer, problems[n // G])))
            rows.append((prompts[n // G], ids, seq.forced_at))
            lengths.append(len(ids))
            thinking.append(self._thinking_tokens(ids))
        self.model.train(was_training)
        reward = torch.tensor(rewards).view(per_rank, G)
        adv = group_advantages(reward, rl.std_normalize).flatten()
        self.metrics |= {
            "reward": reward.mean().item(),
            "pass_rate": (reward >= 1).float().mean().item(),
            "completion_len": sum(lengths) / len(lengths),
            "thinking_len": sum(thinking) / len(thinking),
            "equal_groups": (reward.max(1).values == reward.min(1).values).float().mean().item(),
            "rollout_tokens": self.rollout_tokens,  # prompts prefilled + tokens sampled, this rank
            "rollout_s": self.rollout_seconds,
        }
        return [self._batch(rows[i : i + self.micro_batch], adv[i : i + self.micro_batch])
                for i in range(0, len(rows), self.micro_batch)]  # fmt: skip

    def _thinking_tokens(self, ids: list[int]) -> int:
        if self.think[0] not in ids:
            return 0
        start = ids.index(self.think[0])
        return (ids.index(self.think[1], start) if self.think[1] in ids[start:] else len(ids)) - start - 1

    def _batch(self, rows: list[tuple[list[int], list[int], list[int]]], adv: torch.Tensor) -> tuple:
        """Rows prompt + completion padded to the longest: targets -1 on the prompt, the padding and the tokens a
        tool forced."""
        device = next(self.model.parameters()).device
        L = max(len(p) + len(c) - 1 for p, c, _ in rows)
        x = torch.full((len(rows), L), self.tok.eot, dtype=torch.long)
        y = torch.full((len(rows), L), -1, dtype=torch.long)
        a = torch.zeros(len(rows), L)
        for r, (prompt, completion, forced) in enumerate(rows):
            seq = prompt + completion
            x[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            y[r, len(prompt) - 1 : len(seq) - 1] = torch.tensor(completion)
            a[r, len(prompt) - 1 : len(seq) - 1] = adv[r]
            for i in forced:  # the tool wrote them, not the policy
                y[r, len(prompt) - 1 + i] = -1
        return x.to(device), y.to(device), a.to(device), {}
