"""The training loop: overfitting, gradient accumulation, DDP equivalence, clear errors, plots."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.cli.main import main
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from tests.conftest import REPO, assert_close_f32

TINY = {
    "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "padded_vocab_size": 50304},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "decay_steps": 8},
    "train": {"max_steps": 4, "total_batch": 256, "micro_batch": 4, "save_every": 2, "device": "cpu"},
    "eval": {"val_every": 2, "val_batches": 2},
    "log": {"tensorboard": False},
}


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory, shared_data) -> Path:
    """Tiny Shakespeare prepared into shards once per session (~2 s)."""
    from gpt2lab.data.prepare import Settings, prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare(Settings("shakespeare", shard_size=10_000_000), out, workers=1)
    return out


def _toml(value) -> str:
    return (
        json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)
    )


def write_config(folder: Path, data: Path, **sections) -> Path:
    """A tiny-model TOML config in folder; sections={"train": {...}} override TINY's values."""
    values = {name: dict(table) for name, table in TINY.items()}
    values["data"] = {"path": str(data)}
    for name, table in sections.items():
        values.setdefault(name, {}).update(table)
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in t.items()) for s, t in values.items())
    path = folder / "tiny.toml"
    path.write_text(text)
    return path


def read_metrics(run_dir: Path, key: str = "train_loss") -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


class FixedBatches:
    """A loader stand-in: the rows of one batch, handed out micro-batch by micro-batch, forever."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, micro: int):
        self.x, self.y, self.micro, self.i = x, y, micro, 0

    def next_batch(self):
        n = self.x.size(0) // self.micro
        j = self.i % n
        self.i += 1
        return self.x[j * self.micro : (j + 1) * self.micro], self.y[j * self.micro : (j + 1) * self.micro]


# ----------------------------------------------------------------------------- the step


def test_tiny_model_overfits_one_batch():
    from gpt2lab.train.loop import train_step
    from gpt2lab.train.optim import OptimConfig, make_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=64))
    data = torch.randint(0, 128, (4, 17))
    batches = FixedBatches(data[:, :-1], data[:, 1:], micro=4)
    opt = make_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0), "cpu")
    losses = [train_step(model, model, opt, batches, 1, autocast=nullcontext, grad_clip=1.0)[0] for _ in range(150)]
    assert losses[0] > 4.0  # ~ln(128) at the start
    assert losses[-1] < 0.1, losses[-10:]


def test_grad_accumulation_equals_one_big_batch():
    from gpt2lab.train.loop import forward_backward

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    data = torch.randint(0, 128, (8, 17))
    x, y = data[:, :-1], data[:, 1:]
    grads = {}
    for k in (1, 4):
        model.zero_grad(set_to_none=True)
        loss = forward_backward(model, FixedBatches(x, y, micro=8 // k), k, nullcontext, ddp=False)
        grads[k] = ({n: p.grad.clone() for n, p in model.named_parameters()}, loss.item())
    assert_close_f32(grads[4][1], grads[1][1])  # batches of 8 against 4 x 2: other GEMM shapes, other rounding
    for name, g in grads[1][0].items():
        assert_close_f32(grads[4][0][name], g, terms=x.numel(), msg=name)  # sums over the B*T rows


def test_grad_accum_steps_needs_divisible_total_batch():
    from gpt2lab.config import build_config
    from gpt2lab.errors import Gpt2LabError
    from gpt2lab.train.run import grad_accum_steps

    cfg = build_config(TINY, "tiny")
    assert grad_accum_steps(cfg, 1) == 2  # 256 / (4 x 32)
    assert grad_accum_steps(cfg, 2) == 1
    with pytest.raises(Gpt2LabError, match=r"world size \(4 x 32 x 3 = 384\)"):
        grad_accum_steps(cfg, 3)


# ----------------------------------------------------------------------------- whole runs


def test_train_run_writes_metrics_checkpoints_and_plot(tmp_path, shakespeare_data, capsys):
    cfg = write_config(
        tmp_path, shakespeare_data, log={"tensorboard": True}, eval={"sample_every": 4, "sample_tokens": 8}
    )
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--set", "train.keep_checkpoints=1"]) == 0
    out = capsys.readouterr().out
    assert "step      4/4 | loss" in out and "tok/s" in out and "MFU" not in out  # no MFU on CPU
    assert "sample 0: Hello, I'm a language model," in out
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_0000004"]  # keep_checkpoints=1
    assert set(read_metrics(run)) == {1, 2, 3, 4}
    assert set(read_metrics(run, "val_loss")) == {0, 2, 4}
    assert any((run / "tb").iterdir())
    state = ckpt.read_json(run / "checkpoints" / "step_0000004" / "config.json")["train_state"]
    assert state["step"] == 4 and state["config"]["train"]["max_steps"] == 4 and state["loader"]["batch"] == 8
    assert "max_steps = 4" in (run / "config.toml").read_text()
    # the checkpoint is a plain model checkpoint too: `gpt2lab sample --model RUN_DIR` loads it
    from gpt2lab.interop.load import load_model

    assert load_model(str(run)).config.n_embd == 32
    assert main(["plot", str(run)]) == 0
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl: file not found" in capsys.readouterr().err
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path, shakespeare_data):
    """2 gloo ranks x micro-batch 2 == 1 process accumulating 2 micro-batches of 2 (1e-6), after 3 steps."""
    cfg = write_config(
        tmp_path, shakespeare_data, train={"max_steps": 3, "total_batch": 128, "micro_batch": 2, "save_every": 0},
        eval={"val_every": 3},
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2lab",
         "train", str(cfg), "--run-dir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stdout[-1500:] + ddp.stderr[-3000:]  # how far each rank got, and why it stopped
    assert "2 x cpu, grad accumulation 1" in ddp.stdout
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "one")]) == 0
    one, two = ckpt.find_latest(tmp_path / "one"), ckpt.find_latest(tmp_path / "ddp")
    assert one.name == two.name == "step_0000003"
    w1, w2 = (ckpt.load_state_dict(p / ckpt.WEIGHTS_NAME) for p in (one, two))
    for name, w in w1.items():  # both 1 thread; an all-reduce of two halves then / 2 rounds like accumulating halves
        assert_close_f32(w2[name], w, msg=name)
    loss1, loss2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ddp")  # rank 0 wrote it once
    assert sorted(loss2) == [1, 2, 3]
    assert_close_f32([loss2[s] for s in sorted(loss1)], [loss1[s] for s in sorted(loss1)])
    assert sorted(read_metrics(tmp_path / "ddp", "val_loss")) == [0, 3]  # over val_batches per rank: not comparable


# ----------------------------------------------------------------------------- clear errors


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_dataset_folder_is_one_clear_error(tmp_path, capsys):
    cfg = write_config(tmp_path, tmp_path / "nowhere")
    err = _error(capsys, ["train", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert "nowhere does not exist" in err and "gpt2lab data prepare" in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_indivisible_total_batch_is_an_error_before_any_work(tmp_path, shakespeare_data, capsys):
    cfg = write_config(tmp_path, shakespeare_data)
    err = _error(capsys, ["train", str(cfg), "--set", "train.total_batch=1000", "--run-dir", str(tmp_path / "r")])
    assert "train.total_batch (1000) is not divisible by train.micro_batch x model.block_size (4 x 32 = 128)" in err
    assert not (tmp_path / "r").exists()


def test_resume_with_another_model_shape_is_a_clear_error(tmp_path, shakespeare_data, capsys):
    cfg = write_config(tmp_path, shakespeare_data, train={"max_steps": 1}, eval={"val_every": 0})
    run = str(tmp_path / "run")
    assert main(["train", str(cfg), "--run-dir", run]) == 0
    err = _error(capsys, ["train", "--resume", run, "--set", "model.n_embd=64", "--set", "train.max_steps=2"])
    assert "step_0000001/model.safetensors" in err and "has shape" in err and "but the config needs" in err
    # and the run folder is protected: training it again from scratch is refused, unless it is finished
    err = _error(capsys, ["train", str(cfg), "--run-dir", run, "--set", "optim.lr=1e-4"])
    assert "already holds checkpoints" in err and f"--resume {run}" in err
    assert main(["train", str(cfg), "--run-dir", run]) == 0  # the same finished run: nothing to do
    assert "already trained with this config (step_0000001); nothing to do" in capsys.readouterr().out
    err = _error(capsys, ["train", "--resume", str(tmp_path)])
    assert "no complete checkpoint" in err
    err = _error(capsys, ["train", "--resume", run, "--run-dir", str(tmp_path / "other")])
    assert "leave out --run-dir" in err


def test_cuda_oom_names_the_setting_to_lower(tmp_path, shakespeare_data, capsys, monkeypatch):
    from gpt2lab.train import loop as train

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(train, "train_step", oom)
    cfg = write_config(tmp_path, shakespeare_data, eval={"val_every": 0})
    err = _error(capsys, ["train", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert "out of memory on cpu with train.micro_batch=4 x model.block_size=32" in err
    assert "--set train.micro_batch=2, or auto" in err and "Tried to allocate" not in err  # no allocator dump
    assert "perf.activation_checkpointing=true" in err and "perf.ce_chunk_size=8192" in err  # the other knobs
    assert "model.block_size (now 32)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, shakespeare_data, capsys, monkeypatch):
    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, kv_cache=None):
        logits, loss = forward(self, idx, targets, kv_cache)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 4:  # from step 3 on (2 micro-steps per step)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    cfg = write_config(tmp_path, shakespeare_data, eval={"val_every": 0})
    run = tmp_path / "run"
    err = _error(capsys, ["train", str(cfg), "--run-dir", str(run)])
    assert "step 3: the loss is nan" in err and "step_0000002" in err
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_0000002"]  # the NaN update never landed


def test_bench_train_prints_the_table(tmp_path, shakespeare_data, capsys):
    cfg = write_config(tmp_path, shakespeare_data)
    assert main(["bench", "train", "--config", str(cfg), "--steps", "2", "--warmup", "1", "--compile", "off"]) == 0
    out = capsys.readouterr().out
    assert "B=4 T=32 x 1 micro-steps = 128 tokens/step, cpu" in out
    header, _, row = out.splitlines()[1:4]
    assert [h.strip() for h in header.split("|")][:4] == [
        "variant",
        "ms/step",
        "tokens/s",
        "MFU",
    ] and "peak memory" in header
    assert row.split("|")[0].strip() == "compile off" and row.split("|")[3].strip() == "n/a"


@pytest.mark.parametrize("val_tokens", [0, 300])
def test_a_small_corpus_trains_with_a_short_or_no_val_split(tmp_path, shared_data, capsys, val_tokens):
    """A corpus of a few files: a val split shorter than one batch gets smaller val batches; none, no val loss."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:40_000]
    (tmp_path / "docs").mkdir()
    for i in range(10):
        (tmp_path / "docs" / f"{i}.txt").write_text(text[4000 * i : 4000 * (i + 1)])
    data = tmp_path / "ds"
    assert main(["data", "prepare", "files", str(tmp_path / "docs" / "*.txt"), "--out", str(data),
                 "--val-tokens", str(val_tokens)]) == 0  # fmt: skip
    model = {**TINY["model"], "block_size": 64}  # a val batch of 32 x 64 tokens: more than a ~1k-token val split
    cfg = write_config(tmp_path, data, model=model, train={"max_steps": 2, "micro_batch": 32, "total_batch": 2048},
                       eval={"val_every": 1, "val_batches": 4})  # fmt: skip
    capsys.readouterr()
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    val = read_metrics(tmp_path / "run", "val_loss")
    if val_tokens:
        assert "val batches of" in err and sorted(val) == [0, 1, 2] and all(math.isfinite(v) for v in val.values())
    else:
        assert "val loss unavailable" in err and val == {}
