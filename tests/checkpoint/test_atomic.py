"""Atomic checkpoint saves: one helper for the plain and the sharded (DCP) format, safe against a kill at any step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab.checkpoint import atomic
from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from tests.conftest import REPO

FORMATS = ["plain", "dcp"]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])),
}


def tiny(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))


def save(fmt: str, run: Path, step: int, seed: int) -> Path:
    """A training checkpoint of step in the given format, of the model that `seed` initialises."""
    from gpt2lab.train import dcp

    model = tiny(seed)
    optimizer = torch.optim.AdamW(model.parameters())
    saver = dcp.save_training_checkpoint if fmt == "dcp" else ckpt.save_training_checkpoint
    return saver(run, step, model, optimizer, {"step": step, "seed": seed}, ckpt.rng_state()[0])


def saved_seed(folder: Path) -> int:
    """Which model a checkpoint holds, checked against its weights (a complete folder, not a mix of two saves)."""
    seed = ckpt.read_json(folder / ckpt.CONFIG_NAME)["train_state"]["seed"]
    loaded, expected = ckpt.load_model(folder).state_dict(), tiny(seed).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items()), folder
    return seed


# The same step saved twice (seed 0, then seed 1), SIGKILLed when the new folder is about to be renamed into place:
# after the old one has gone out of the way (moved aside, or deleted), before the new one has its name.
KILLED_RESAVE = """
import os, signal, sys
from pathlib import Path
from tests.checkpoint.test_atomic import save

fmt, run = sys.argv[1], Path(sys.argv[2])
save(fmt, run, 1, seed=0)
real_rename, real_replace = os.rename, os.replace

def die_on_publish(real):
    def rename(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".tmp_") and Path(dst).name.startswith("step_"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *args, **kwargs)
    return rename

os.rename, os.replace = die_on_publish(real_rename), die_on_publish(real_replace)
save(fmt, run, 1, seed=1)
"""


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("then", ["load", "save"])
def test_a_kill_between_aside_and_rename_keeps_the_step(tmp_path, fmt, then):
    """Killed between "the old folder out of the way" and "the new one renamed into place", the step is still on
    disk, and the next load (find_latest) or the next save brings it back under its name, leaving no debris."""
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", KILLED_RESAVE, fmt, str(run)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == -9, out.stderr[-2000:]
    root = run / "checkpoints"
    left = sorted(p.name for p in root.iterdir())
    if then == "load":
        assert ckpt.find_latest(run) == root / "step_0000001", left
    else:
        save(fmt, run, 2, seed=2)
        assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"], left
        assert saved_seed(root / "step_0000002") == 2
    assert saved_seed(root / "step_0000001") in (0, 1)  # the old save or the new one, whole
    assert not list(root.glob(".old_*/*"))  # the aside copy went back (a reader leaves its empty folder)


@pytest.mark.parametrize("fmt", FORMATS)
def test_both_formats_save_through_the_one_helper(tmp_path, monkeypatch, fmt):
    """Each format writes into atomic.temp_dir, publishes with atomic.publish (a resave replaces the step), and
    starts with atomic.recover: the one helper, no copy of its own."""
    calls = []
    for name in ("temp_dir", "publish", "recover"):
        real = getattr(atomic, name)
        monkeypatch.setattr(atomic, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    root = tmp_path / "checkpoints"
    for seed in (0, 1):
        assert save(fmt, tmp_path, 3, seed) == root / "step_0000003"
    assert calls == ["recover", "temp_dir", "publish"] * 2
    assert [p.name for p in root.iterdir()] == ["step_0000003"] and saved_seed(root / "step_0000003") == 1


def folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "data").write_text(text)
    return path


def test_publish_names_a_new_folder_and_replaces_an_existing_one(tmp_path):
    final = tmp_path / "step_0000001"
    tmp = atomic.temp_dir(final)
    assert tmp.parent == tmp_path and tmp.name.startswith(".tmp_step_0000001_")
    (tmp / "data").write_text("old")
    assert atomic.publish(tmp, final) == final and (final / "data").read_text() == "old"
    atomic.publish(folder(tmp_path / ".tmp_new", "new"), final)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"] and (final / "data").read_text() == "new"


def test_a_failed_rename_into_place_puts_the_old_folder_back(tmp_path, monkeypatch):
    final, tmp = folder(tmp_path / "step_0000001", "old"), folder(tmp_path / ".tmp_new", "new")
    real = os.rename

    def full_disk(src, dst):
        if Path(src) == tmp:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "rename", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic.publish(tmp, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp_new", "step_0000001"]  # tmp: the caller deletes it
    assert (final / "data").read_text() == "old"


def test_publish_wins_over_a_reader_that_moves_the_old_folder_back(tmp_path, monkeypatch):
    """A reader's recover (find_latest) between the two renames puts the old folder back: publish moves it aside
    again and renames the new one into place."""
    final, tmp = folder(tmp_path / "step_0000001", "old"), folder(tmp_path / ".tmp_new", "new")
    real, readers = os.rename, []

    def reader_in_between(src, dst):
        real(src, dst)
        if Path(src) == final and not readers:
            readers.append(1)
            atomic.recover(tmp_path)
            assert (final / "data").read_text() == "old"

    monkeypatch.setattr(os, "rename", reader_in_between)
    atomic.publish(tmp, final)
    assert readers and [p.name for p in tmp_path.iterdir()] == ["step_0000001"]
    assert (final / "data").read_text() == "new"


def test_recover_moves_back_and_only_the_writer_deletes(tmp_path):
    """A reader moves an aside copy back when its name is free and deletes nothing; the writer (clean=True) also
    deletes aside copies whose name holds the newer folder, and temporary folders of killed saves."""
    folder(tmp_path / ".old_a" / "step_0000001", "old 1")  # killed before its new folder got the name
    folder(tmp_path / "step_0000002", "new 2")
    folder(tmp_path / ".old_b" / "step_0000002", "old 2")  # killed after: the new one has it
    folder(tmp_path / ".tmp_step_0000003_x", "half")  # killed while written
    atomic.recover(tmp_path)
    assert (tmp_path / "step_0000001" / "data").read_text() == "old 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".old_a", ".old_b", ".tmp_step_0000003_x", "step_0000001", "step_0000002"
    ]  # fmt: skip
    atomic.recover(tmp_path, clean=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001", "step_0000002"]
    assert (tmp_path / "step_0000002" / "data").read_text() == "new 2"
