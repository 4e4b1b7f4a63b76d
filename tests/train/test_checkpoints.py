"""Training checkpoints: exact resume, SIGTERM, a crash during a save, RNG states, pruning."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.cli.main import main
from tests.conftest import REPO
from tests.train.test_loop import read_metrics, shakespeare_data, write_config  # noqa: F401 (fixtures)

STEPS = 8  # the straight run; optim.decay_steps is 8 in every run, so the schedules agree


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shakespeare_data):  # noqa: F811
    """8 steps in one go (2 micro-steps each): the reference loss sequence."""
    folder = tmp_path_factory.mktemp("straight")
    cfg = write_config(folder, shakespeare_data, train={"max_steps": STEPS, "save_every": 0})
    torch.set_num_threads(1)
    assert main(["train", str(cfg), "--run-dir", str(folder / "run")]) == 0
    return cfg, folder / "run"


def _all_metrics(run_dir) -> dict:
    return {key: read_metrics(run_dir, key) for key in ("train_loss", "val_loss", "grad_norm", "lr")}


def test_resume_gives_bit_identical_losses(tmp_path, straight_run):
    cfg, straight = straight_run
    run = str(tmp_path / "run")
    assert main(["train", str(cfg), "--run-dir", run, "--set", f"train.max_steps={STEPS // 2}"]) == 0
    assert main(["train", "--resume", run, "--set", f"train.max_steps={STEPS}"]) == 0
    resumed, reference = _all_metrics(tmp_path / "run"), _all_metrics(straight)
    assert sorted(resumed["train_loss"]) == list(range(1, STEPS + 1))
    # exact float equality at every step (losses, val losses, norms, lr): one process, one thread (set by the
    # fixtures), so the same kernels in the same order; with another thread count the norms differ in the last bit.
    assert resumed == reference


def test_sigterm_saves_then_resume_continues_exactly(tmp_path, straight_run):
    cfg, straight = straight_run
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "train", str(cfg), "--run-dir", str(run), "--set", "train.max_steps=1000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step      2/1000"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == 0, err[-2000:]
    assert f"Continue with: gpt2lab train --resume {run}" in out
    latest = ckpt.find_latest(run)
    stopped = int(latest.name[5:])
    assert 2 <= stopped <= STEPS - 2, out  # it finished the step it was in, then saved
    assert ckpt.load_model(latest).config.n_layer == 2  # a loadable checkpoint
    assert main(["train", "--resume", str(run), "--set", f"train.max_steps={stopped + 2}"]) == 0
    losses, reference = read_metrics(run), read_metrics(straight)
    assert sorted(losses) == list(range(1, stopped + 3))
    assert losses == {s: reference[s] for s in losses}  # exact: both runs 1 thread (OMP_NUM_THREADS=1 above), one CPU


def test_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path, shakespeare_data, monkeypatch, capsys):  # noqa: F811
    cfg = write_config(tmp_path, shakespeare_data, eval={"val_every": 0})
    run = tmp_path / "run"
    real_save = ckpt.save_model

    def crash_on_second(model, folder, extra=None):
        if extra["train_state"]["step"] == 4:  # half-write the weights, then fail like a full disk
            (folder / ckpt.WEIGHTS_NAME).write_bytes(b"\x00" * 100)
            raise OSError(28, "No space left on device")
        return real_save(model, folder, extra)

    monkeypatch.setattr(ckpt, "save_model", crash_on_second)
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 4" in err and "No space left on device" in err
    assert "step_0000002) is intact" in err
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_0000002"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]  # no temp folder left behind
    assert ckpt.load_model(run / "checkpoints" / "step_0000002").config.n_embd == 32
    monkeypatch.setattr(ckpt, "save_model", real_save)
    assert main(["train", "--resume", str(run)]) == 0  # and the run goes on from step 2
    assert ckpt.find_latest(run).name == "step_0000004"


def test_rng_states_round_trip_without_pickle():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    tensors, plain = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.set_rng_state(tensors, plain)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_keep_last_k_and_resave_of_the_same_step(tmp_path):
    from gpt2lab.model.config import GPTConfig
    from gpt2lab.model.gpt import GPT

    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    opt = torch.optim.AdamW(model.parameters())
    tensors, _ = ckpt.rng_state()
    for step in (1, 2, 3, 3):
        ckpt.save_training_checkpoint(tmp_path, step, model, opt, {"step": step}, tensors, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_0000002", "step_0000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    state, rng = ckpt.load_training_checkpoint(tmp_path / "checkpoints" / "step_0000003", model, opt)
    assert state == {"step": 3} and torch.equal(rng["torch"], tensors["torch"])
