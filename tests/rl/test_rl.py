"""`gpt2lab rl` through the training loop: rewards move the policy, metrics are logged, resume is bit-exact."""

from __future__ import annotations

import json
import shutil

import torch

from gpt2lab import checkpoint as ckpt
from gpt2lab.chat.base import CHAT_VOCAB_SIZE
from gpt2lab.checkpoint import TRAIN_STATE_KEY, save_model
from gpt2lab.cli import main
from gpt2lab.model import GPT, GPTConfig

SETS = (
    "train.max_steps=4 train.save_every=2 train.keep_checkpoints=0 train.micro_batch=2 log.tensorboard=false "
    "rl.prompts_per_step=2 rl.group_size=2 rl.max_new_tokens=6 rl.lr=1e-2 rl.eval_every=2 rl.eval_problems=2"
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
    assert [r["step"] for r in records if "eval_reward" in r] == [1, 3]  # before rollouts 0 and 2

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
