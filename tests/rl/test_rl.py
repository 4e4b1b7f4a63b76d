"""`gpt2lab rl` through the training loop: rewards move the policy, metrics are logged, resume is bit-exact."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from gpt2lab.chat.base import CHAT_VOCAB_SIZE
from gpt2lab.chat.template import render_prompt
from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, save_model
from gpt2lab.cli.main import main
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT

SETS = (
    "train.max_steps=4 train.save_every=2 train.keep_checkpoints=0 train.micro_batch=2 log.tensorboard=false "
    "rl.prompts_per_step=2 rl.group_size=2 rl.max_new_tokens=6 rl.lr=1e-2 "
    "rl.eval_every=2 rl.eval_problems=2 rl.eval_samples=2"
).split()


def _chat_model(folder, vocab: int = CHAT_VOCAB_SIZE) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=vocab, padded_vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    extra = {TRAIN_STATE_KEY: {"config": {"sft": {"data": "x.jsonl"}}}} if vocab == CHAT_VOCAB_SIZE else None
    save_model(model, folder, extra=extra)


def _task(tmp_path) -> str:
    """A JSONL task whose verifier rewards odd-length answers: an untrained model scores 0 and 1 by chance, so the
    advantages are not all 0 and the policy moves."""
    folder = tmp_path / "task"
    folder.mkdir()
    for split in ("train", "test"):
        rows = [{"prompt": f"say {i}", "answer": str(i)} for i in range(6)]
        (folder / f"{split}.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (tmp_path / "odd.py").write_text("def reward(answer, reference):\n    return float(len(answer) % 2)\n")
    return str(folder)


def test_an_rl_run_moves_the_policy_logs_rewards_and_resumes_exactly_without_its_start(tmp_path):
    _chat_model(tmp_path / "policy")
    args = ["rl", "--model", str(tmp_path / "policy"), "--task", _task(tmp_path), "--run-dir", str(tmp_path / "a")]
    args += ["--set", f"rl.verifier={tmp_path / 'odd.py'}:reward"]
    for s in SETS:
        args += ["--set", s]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("pass_rate", "completion_len", "thinking_len", "equal_groups", "entropy"):
        assert all(key in r for r in steps), key
    assert 0 < sum(r["reward"] for r in steps) < 4  # some rewarded, some not: a gradient to follow
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evals] == [1, 3]  # before rollouts 0 and 2
    for r in evals:  # rl.eval_samples=2: the share right of 2 problems x 2 samples, a multiple of 1/4
        assert 0 <= r["eval_sampled_reward"] <= 1 and (4 * r["eval_sampled_reward"]).is_integer()

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000004")
    shutil.rmtree(tmp_path / "policy")  # the checkpoint holds every weight: a resume never reads the start
    assert main(["train", "--resume", str(tmp_path / "b")]) == 0
    last = [p / "checkpoints" / "step_0000004" / ckpt.WEIGHTS_NAME for p in (tmp_path / "a", tmp_path / "b")]
    w_a, w_b = map(ckpt.load_state_dict, last)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)  # the same rollouts were sampled after the resume
    _chat_model(tmp_path / "start")
    start = ckpt.load_state_dict(tmp_path / "start" / ckpt.WEIGHTS_NAME)
    assert any(not torch.equal(w_a[k], start[k]) for k in w_a)  # and they moved the policy


def test_a_base_model_or_a_missing_task_is_refused_with_one_line(tmp_path, capsys):
    _chat_model(tmp_path / "base", vocab=50257)
    assert main(["rl", "--model", str(tmp_path / "base"), "--task", "arith"]) == 2
    assert "base model" in capsys.readouterr().err
    _chat_model(tmp_path / "chat")
    assert main(["rl", "--model", str(tmp_path / "chat")]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["rl", "--model", str(tmp_path / "chat"), "--task", "arith", "--set", "rl.group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err


def _vowel_task(tmp_path) -> tuple[str, str]:
    """A one-token bandit: the reward is 1 when the reply starts with a vowel (a verifier file)."""
    folder = tmp_path / "vowels"
    folder.mkdir()
    for split in ("train", "test"):
        rows = [{"prompt": f"{split} {i}", "answer": "-"} for i in range(16)]
        (folder / f"{split}.jsonl").write_text("\n".join(map(json.dumps, rows)))
    verifier = "def reward(answer, reference):\n    return float(answer.strip()[:1] in 'aeiou')\n"
    (tmp_path / "vowel.py").write_text(verifier)
    return str(folder), f"{tmp_path / 'vowel.py'}:reward"


def _peaky_policy():
    """An untrained chat model with its embeddings scaled up: a peaked policy, as a trained one is."""
    from tests.serve.conftest import tiny_chat_model

    model = tiny_chat_model(32)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)
    return model


def test_a_rollout_batch_estimates_the_exact_policy_gradient(tmp_path, tokenizer):
    """On a one-token bandit the expected reward J = sum_a pi(a) r(a) and its gradient are exact: the sampled
    reward matches J and the loss's gradient points along grad J (negated advantages point away)."""
    from gpt2lab.chat.template import render_prompt
    from gpt2lab.rl.grpo import policy_loss, token_logprobs
    from gpt2lab.rl.rollout import RLConfig, RolloutLoader

    task, verifier = _vowel_task(tmp_path)
    model = _peaky_policy()
    rl = RLConfig(model="-", task=task, verifier=verifier, group_size=256, prompts_per_step=2, max_new_tokens=1)
    loader = RolloutLoader(model, tokenizer, rl, micro_batch=512, rank=0, world_size=1, seed=0)
    x, y, adv, _ = loader.next_batch()
    sampled = loader.stats()["reward"]
    params = list(model.parameters())
    V = model.config.vocab_size
    reward = torch.tensor([float(tokenizer.decode([i]).strip()[:1] in "aeiou") for i in range(tokenizer.eot)])
    reward = torch.cat([reward, torch.zeros(V - len(reward))])  # <|endoftext|> and the special tokens: 0
    prompts = [render_prompt(loader._problem(j).messages, tokenizer) for j in range(2)]
    J = sum((torch.softmax(model(torch.tensor([p]))[0][0, -1], -1) * reward).sum() for p in prompts) / 2
    exact = torch.autograd.grad(J, params)

    def cosine(advantages) -> float:
        estimate = torch.autograd.grad(policy_loss(token_logprobs(model(x)[0], y), y, advantages), params)
        dot = sum((-e * g).sum() for e, g in zip(estimate, exact))
        return float(dot / (sum((e * e).sum() for e in estimate).sqrt() * sum((g * g).sum() for g in exact).sqrt()))

    assert abs(sampled - J.item()) < 0.07  # 512 samples: 4 standard errors
    assert cosine(adv) > 0.5 and cosine(-adv) < -0.5


def test_gpt2lab_rl_raises_the_reward_of_a_bandit_it_can_learn(tmp_path):
    task, verifier = _vowel_task(tmp_path)
    save_model(_peaky_policy(), tmp_path / "policy", extra={TRAIN_STATE_KEY: {"config": {"sft": {"data": "x"}}}})
    args = ["rl", "--model", str(tmp_path / "policy"), "--task", task, "--run-dir", str(tmp_path / "run")]
    sets = (
        f"rl.verifier={verifier} train.max_steps=8 train.save_every=0 train.micro_batch=64 log.tensorboard=false "
        "rl.prompts_per_step=4 rl.group_size=16 rl.max_new_tokens=1 rl.lr=1e-2 rl.eval_every=0"
    )
    for s in sets.split():
        args += ["--set", s]
    assert main(args) == 0
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rewards[0] < 0.5 and sum(rewards[-3:]) / 3 > rewards[0] + 0.3, rewards


def test_several_epochs_per_rollout_and_a_kl_penalty_run_through_the_loop(tmp_path):
    """rl.epochs=2: each rollout serves two optimizer steps (rollout metrics at steps 1 and 3); rl.kl > 0 reads
    the starting policy as the frozen reference."""
    _chat_model(tmp_path / "policy")
    args = ["rl", "--model", str(tmp_path / "policy"), "--task", _task(tmp_path), "--run-dir", str(tmp_path / "a")]
    args += ["--set", f"rl.verifier={tmp_path / 'odd.py'}:reward", "--set", "rl.epochs=2", "--set", "rl.kl=0.1"]
    for s in SETS:
        args += ["--set", s]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 3]
    assert all(math.isfinite(r["train_loss"]) for r in records if "train_loss" in r)


def test_two_ddp_ranks_sample_the_same_rollouts_and_take_the_same_steps_as_one_process(tmp_path):
    """Under torchrun each rank samples its share of the step's prompts (a group whole on one rank, seeded by its
    index), the loss is averaged over all ranks' completion tokens and DDP sums the gradients: the logged figures
    are the mean over ranks, equal to one process's, and the weights after 3 steps match it."""
    from tests.conftest import assert_close_f32
    from tests.train.test_fsdp import torchrun

    _chat_model(tmp_path / "policy")
    args = ["rl", "--model", str(tmp_path / "policy"), "--task", _task(tmp_path)]
    args += ["--set", f"rl.verifier={tmp_path / 'odd.py'}:reward", "--set", "optim.grad_clip=0"]
    sets = [s.replace("max_steps=4", "max_steps=3") for s in SETS] + ["rl.prompts_per_step=4", "rl.eval_every=0"]
    for s in sets:
        args += ["--set", s]
    torch.set_num_threads(1)
    assert main([*args, "--run-dir", str(tmp_path / "one")]) == 0
    torchrun(*args, "--run-dir", str(tmp_path / "two"))

    def rollout_figures(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        keys = ("reward", "pass_rate", "completion_len", "equal_groups")
        return [[r[k] for k in keys] for r in records if "reward" in r]

    one, two = rollout_figures(tmp_path / "one"), rollout_figures(tmp_path / "two")
    assert len(one) == 3 and 0 < sum(r[0] for r in one) < 3
    assert two == one
    last = [p / "checkpoints" / "step_0000003" / ckpt.WEIGHTS_NAME for p in (tmp_path / "one", tmp_path / "two")]
    w_one, w_two = map(ckpt.load_state_dict, last)
    for name in w_one:
        if name.endswith("attn.c_attn.bias"):  # the key third's gradient is 0 in exact arithmetic (softmax ignores
            # a constant added to every score): AdamW turns its rounding noise into lr-sized steps (see test_fsdp)
            q, _, v = w_one[name].chunk(3)
            q2, _, v2 = w_two[name].chunk(3)
            w_one[name], w_two[name] = torch.cat([q, v]), torch.cat([q2, v2])
        assert_close_f32(w_two[name], w_one[name], msg=name)


def test_an_optim_key_the_rl_schedule_replaces_is_refused_naming_the_rl_key(tmp_path, capsys):
    """[rl]'s lr, warmup and weight decay replace [optim]'s (its lr is constant): optim.lr would be dropped."""
    import argparse

    from gpt2lab.rl.command import rl_config

    _chat_model(tmp_path / "chat")
    argv = ["rl", "--model", str(tmp_path / "chat"), "--task", str(tmp_path / "missing.jsonl")]
    capsys.readouterr()
    assert main([*argv, "--set", "optim.lr=3e-3"]) == 2
    assert capsys.readouterr().err == "error: optim.lr is set by rl.lr in gpt2lab rl: use --set rl.lr=3e-3\n"
    assert main([*argv, "--set", "optim.min_lr_ratio=0.1"]) == 2
    assert "optim.min_lr_ratio has no effect in gpt2lab rl" in capsys.readouterr().err
    (tmp_path / "c.toml").write_text("[optim]\nlr = 3e-3\n")
    assert main([*argv[:1], str(tmp_path / "c.toml"), *argv[1:]]) == 2
    assert "optim.lr is set by rl.lr in gpt2lab rl: write lr = 0.003 in [rl]" in capsys.readouterr().err
    args = argparse.Namespace(config=None, model=str(tmp_path / "chat"), task="arith",
                              set=["rl.lr=3e-3", "optim.beta2=0.99"])  # fmt: skip
    cfg = rl_config(args)
    assert (cfg.optim.lr, cfg.optim.beta2, cfg.optim.min_lr_ratio) == (3e-3, 0.99, 1.0)


def test_a_rollout_counts_the_tokens_it_computed_and_the_step_its_trained_positions(tmp_path, tokenizer):
    """Rollout tokens/s counts each group's prompt once plus every sampled token; the step's tokens/s counts the
    positions its micro-batches trained (rows x padded length, not prompts x G x block_size), over the step's time
    less its rollout's."""
    from gpt2lab.rl.objective import RLObjective
    from gpt2lab.rl.rollout import RLConfig, RolloutLoader

    task, verifier = _vowel_task(tmp_path)
    model = _peaky_policy()
    rl = RLConfig(model="-", task=task, verifier=verifier, group_size=4, prompts_per_step=3, max_new_tokens=5)
    objective = RLObjective(rl)
    objective.loader = loader = RolloutLoader(model, tokenizer, rl, micro_batch=6, rank=0, world_size=1, seed=0)
    batches = [loader.next_batch() for _ in range(loader.per_rollout)]
    for batch in batches:
        objective.loss(model, batch, batch[1])
    stats = objective.stats()
    prompts = sum(len(render_prompt(loader._problem(j).messages, tokenizer)) for j in range(3))
    sampled = sum(int((y != -1).sum()) for _, y, _, _ in batches)  # every sampled token is trained here
    assert stats["rollout_tokens"] == prompts + sampled
    assert stats["rollout_tokens_per_s"] == pytest.approx(stats["rollout_tokens"] / loader.rollout_seconds)
    tokens, seconds = objective.step_tokens(3 * 4 * model.config.block_size, loader.rollout_seconds + 2.0)
    assert tokens == sum(x.numel() for x, _, _, _ in batches) < 3 * 4 * model.config.block_size
    assert seconds == pytest.approx(2.0)


def test_tokens_a_tool_forced_are_never_trained(tmp_path, tokenizer):
    """A rollout row's targets are -1 on the tokens the engine forced (the calculator's output)."""
    from gpt2lab.rl.rollout import RLConfig, RolloutLoader

    task, verifier = _vowel_task(tmp_path)
    rl = RLConfig(model="-", task=task, verifier=verifier, group_size=2, prompts_per_step=1, max_new_tokens=6)
    loader = RolloutLoader(_peaky_policy(), tokenizer, rl, micro_batch=2, rank=0, world_size=1, seed=0)
    loader.tool = FakeTool(lambda tokens: [7, 8] if len(tokens) == 1 else [])  # after the first sampled token: two
    x, y, _, _ = loader.next_batch()
    prompt = len(render_prompt(loader._problem(0).messages, tokenizer))
    for row in range(2):
        start = prompt - 1  # the first completion position: its first token was sampled, so trained
        assert y[row, start] != -1 and x[row, start + 2 : start + 4].tolist() == [7, 8]  # fed to the model
        assert y[row, start + 1 : start + 3].tolist() == [-1, -1]  # never its targets
        assert (y[row, start + 3 :] != -1).sum() == (x[row, start + 3 :] != tokenizer.eot).sum()  # the rest trained


class FakeTool:
    """A tool that forces what ``rule`` says, and bans nothing."""

    banned = ()

    def __init__(self, rule):
        self.forced = rule
