"""float16 with a gradient scaler (V100/T4/RTX 20xx), run on the CPU: a step, a skipped step, save and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.cli.main import main
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT

TINY = {
    "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "padded_vocab_size": 50304},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "decay_steps": 8},
    "train": {"max_steps": 4, "total_batch": 256, "micro_batch": 4, "save_every": 2, "device": "cpu",
              "dtype": "float16"},
    "eval": {"val_every": 0},
    "log": {"tensorboard": False},
}  # fmt: skip
OVERFLOW_STEP = 1  # 0-based optimizer step whose gradient is made inf (before the save at step 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data) -> Path:
    from gpt2lab.data.prepare import Settings, prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare(Settings("shakespeare", shard_size=10_000_000), out, workers=1)
    return out


def _config(folder: Path, data: Path) -> Path:
    lines = []
    for section, table in {**TINY, "data": {"path": str(data)}}.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = folder / "fp16.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class InfGradient(torch.autograd.Function):
    """Identity forward; an inf gradient backward: a float16 overflow with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.fixture
def overflow_at_one_step(monkeypatch):
    """Make the gradient of optimizer step OVERFLOW_STEP inf (the loop's apply_schedule call tells which step it is)."""
    from gpt2lab.train import loop as train

    current = {"step": -1}
    apply_schedule, forward = train.apply_schedule, GPT.forward

    def tracking_schedule(optimizer, step, cfg):
        current["step"] = step
        return apply_schedule(optimizer, step, cfg)

    def forward_with_overflow(self, idx, targets=None, kv_cache=None):
        logits, loss = forward(self, idx, targets, kv_cache)
        if targets is not None and self.training and current["step"] == OVERFLOW_STEP:
            loss = InfGradient.apply(loss)
        return logits, loss

    monkeypatch.setattr(train, "apply_schedule", tracking_schedule)
    monkeypatch.setattr(GPT, "forward", forward_with_overflow)


def _records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_float16_skips_an_overflowed_step_counts_it_and_resumes_exactly(tmp_path, data, overflow_at_one_step, capsys):
    cfg = _config(tmp_path, data)
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", str(cfg), "--run-dir", str(full)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1" in out  # the progress line counts the skipped step
    rec = _records(full)
    assert rec[1]["loss_scale"] == 65536.0 and rec[1]["skipped_steps"] == 0  # torch's initial scale
    assert "grad_norm" not in rec[2] and rec[2]["skipped_steps"] == 1  # the overflow: a skipped step, not a stop
    assert rec[2]["loss_scale"] == 32768.0  # halved by the overflow
    assert rec[4]["skipped_steps"] == 1 and all(r["train_loss"] < 20 for r in rec.values())
    state = ckpt.read_json(full / "checkpoints" / "step_0000004" / "config.json")["train_state"]
    assert state["grad_scaler"]["scale"] == 32768.0 and state["skipped_steps"] == 1

    # the same run in two halves: the scaler's state comes back from the checkpoint of step 2
    assert main(["train", str(cfg), "--run-dir", str(split), "--set", "train.max_steps=2"]) == 0
    assert main(["train", "--resume", str(split), "--set", "train.max_steps=4"]) == 0
    resumed = _records(split)
    for step in (3, 4):
        for key in ("train_loss", "loss_scale", "skipped_steps", "grad_norm"):
            assert resumed[step][key] == rec[step][key], (step, key)
    a, b = (ckpt.load_state_dict(r / "checkpoints" / "step_0000004" / ckpt.WEIGHTS_NAME) for r in (full, split))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact


def test_scaled_step_unscales_before_clipping_and_leaves_weights_alone_on_overflow():
    """One float16 step on the CPU updates the weights; an inf gradient leaves them as they were."""
    from gpt2lab.train.loop import train_step
    from gpt2lab.train.optim import OptimConfig, make_optimizer
    from gpt2lab.train.perf import step_context

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=1, n_head=2, n_embd=32))
    opt = make_optimizer(model, OptimConfig(lr=1e-3, decay_steps=10), "cpu")
    data = torch.randint(0, 128, (2, 17))

    class Batches:
        def next_batch(self):
            return data[:, :-1], data[:, 1:]

    scaler = torch.amp.GradScaler("cpu")
    autocast = step_context("cpu", torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    loss, norm, _ = train_step(model, model, opt, Batches(), 1, autocast=autocast, grad_clip=1.0, scaler=scaler)
    assert 0 < norm < 100  # the true gradient's norm, not the 65536-times scaled one
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() == 65536.0

    after_first = [p.detach().clone() for p in model.parameters()]
    forward = model.forward
    model.forward = lambda idx, targets=None: (None, InfGradient.apply(forward(idx, targets)[1]))
    loss, norm, _ = train_step(model, model, opt, Batches(), 1, autocast=autocast, grad_clip=1.0, scaler=scaler)
    assert math.isfinite(loss) and not math.isfinite(norm)  # a finite loss, an overflowed gradient
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_first))  # the update was skipped
    assert scaler.get_scale() == 32768.0
