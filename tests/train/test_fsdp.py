"""FSDP2 training and DCP checkpoints: meta-device init, parity with one process, resharding resume, atomic saves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.cli.main import main
from gpt2lab.data.loader import ShardLoader
from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from tests.conftest import REPO
from tests.data.conftest import make_dataset
from tests.train.test_loop import read_metrics, shakespeare_data, write_config  # noqa: F401 (fixture)

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])),
}
# untied: the embeddings and the head get FSDP groups of their own; no grad clipping: see test_fsdp_two_ranks_...
RUN = dict(
    model={"tie_embeddings": False},
    optim={"grad_clip": 0.0},
    train={"max_steps": 4, "total_batch": 128, "micro_batch": 2, "save_every": 2, "keep_checkpoints": 0},
    eval={"val_every": 0},
)


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    """`gpt2lab ARGV` on 2 gloo ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2lab", *argv]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-3000:]  # how far each rank got, and why it stopped
    return out


def keep_only(run: Path, step: int, dest: Path) -> Path:
    """A copy of a run folder holding only its checkpoint of `step` (to resume from there)."""
    shutil.copytree(run, dest)
    for folder in ckpt.checkpoint_dirs(dest):
        if folder.name != f"step_{step:07d}":
            shutil.rmtree(folder)
    return dest


def loader_tokens(run: Path) -> int:
    state = ckpt.read_json(ckpt.find_latest(run) / ckpt.CONFIG_NAME)["train_state"]
    return state["loader"]["tokens"]


# ----------------------------------------------------------------------------- in one process


@pytest.mark.parametrize(
    "variant",
    [{}, {"tie_embeddings": False, "x0_skip": True, "value_embeddings": True, "zero_init_proj": True},
     {"n_experts": 4, "pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu"}],
)  # fmt: skip
def test_meta_build_has_the_eager_initial_parameters(variant):
    """Built on "meta" and materialised (whole, or as 2 ranks' rows), the same tensors as GPT(config), same seed."""
    from gpt2lab.train.fsdp import build_on_meta, materialize

    config = GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32, **variant)
    torch.manual_seed(7)
    eager = GPT(config).state_dict()
    after_eager = torch.rand(3)
    torch.manual_seed(7)
    model, values = build_on_meta(config)
    assert all(p.is_meta for p in model.parameters())
    assert torch.equal(torch.rand(3), after_eager)  # the seed's stream advanced as in the eager build
    materialize(model, values, "cpu")
    built = model.state_dict()
    assert built.keys() == eager.keys()
    for name, tensor in eager.items():
        assert torch.equal(built[name], tensor), name
    assert (model.lm_head.weight is model.transformer.wte.weight) == config.tie_embeddings
    for rank in (0, 1):  # each rank keeps its dim-0 chunk, as fully_shard cuts it
        torch.manual_seed(7)
        _, rows = build_on_meta(config, rank, 2)
        for name, tensor in eager.items():
            buffer = name.endswith("e_score_correction_bias")  # MoE's balancing bias: a buffer, not sharded
            assert torch.equal(rows[name], tensor if buffer else torch.chunk(tensor, 2)[rank]), name


def test_loader_position_carries_across_world_sizes(tmp_path):
    """A loader saved on 2 ranks resumes on 1 (and back) at the same token of the same global stream."""
    T, B = 8, 2
    folder = make_dataset(tmp_path / "d", {"train": [np.arange(100 * T + 1)]})
    two = [ShardLoader(folder, "train", B, T, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(3):
        [loader.next_batch() for loader in two]
    state = json.loads(json.dumps(two[0].state_dict()))
    assert state["tokens"] == 3 * B * 2 * T
    one = ShardLoader(folder, "train", B, T, seed=3)
    one.load_state_dict(state)
    for _ in range(4):  # every global batch of 2 ranks = two consecutive batches of 1 process: nothing skipped
        expected = torch.cat([loader.next_batch()[0] for loader in two])
        assert torch.equal(torch.cat([one.next_batch()[0], one.next_batch()[0]]), expected)
    back = ShardLoader(folder, "train", B, T, rank=1, world_size=2, seed=3)
    back.load_state_dict(one.state_dict())  # 1 -> 2
    assert torch.equal(back.next_batch()[0], two[1].next_batch()[0])
    one.next_batch()  # now half a global batch of 2 ranks in: not a place 2 ranks can start from
    with pytest.raises(Gpt2LabError, match="not a whole number of global batches of 4 x 8 tokens"):
        back.load_state_dict(one.state_dict())


def test_fsdp_refuses_what_it_cannot_run(tmp_path, shakespeare_data, capsys):  # noqa: F811
    cfg = write_config(tmp_path, shakespeare_data)
    for sets, message in [
        (["optim.name=muon"], "optim.name=muon does not run under train.parallel=fsdp"),
        (["eval.hellaswag_every=2"], "eval.hellaswag_every needs train.parallel=ddp"),
        (["train.parallel=zero3"], "train.parallel must be ddp or fsdp (got 'zero3')"),
    ]:
        args = [a for s in sets for a in ("--set", s)]
        assert main(["train", str(cfg), "--run-dir", str(tmp_path / "r"), "--set", "train.parallel=fsdp", *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path, shakespeare_data):  # noqa: F811
    """SIGKILL once the shards of step 4 are written (before DCP's metadata, config.json, the rename): step 2 stays."""
    cfg = write_config(tmp_path, shakespeare_data, **RUN)
    run = tmp_path / "run"
    dying = (
        "import os, signal, sys\n"
        "import torch.distributed.checkpoint.filesystem as fs\n"
        "from gpt2lab.cli.main import main\n"
        "write = fs.FileSystemWriter.write_data\n"
        "def write_then_die(self, plan, planner):\n"
        "    if 'step_0000004' in str(self.path):\n"
        "        write(self, plan, planner).wait()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return write(self, plan, planner)\n"
        "fs.FileSystemWriter.write_data = write_then_die\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["train", str(cfg), "--run-dir", str(run), "--set", "train.parallel=fsdp"]
    out = subprocess.run([sys.executable, "-c", dying, *argv], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr[-2000:]
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_0000002"]
    assert len(list((run / "checkpoints").glob(".tmp_step_0000004_*"))) == 1  # the unfinished save, ignored
    assert main(["train", "--resume", str(run)]) == 0  # from step 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]  # no debris
    assert sorted(read_metrics(run)) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 2 gloo ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_data):  # noqa: F811
    """The same 4 steps (checkpoints at 2 and 4): one process (DDP's plain checkpoints), and FSDP on 2 ranks."""
    folder = tmp_path_factory.mktemp("fsdp")
    cfg = write_config(folder, shakespeare_data, **RUN)
    torch.set_num_threads(1)
    assert main(["train", str(cfg), "--run-dir", str(folder / "one")]) == 0
    assert main(["train", str(cfg), "--run-dir", str(folder / "one-fsdp"), "--set", "train.parallel=fsdp"]) == 0
    out = torchrun("train", str(cfg), "--run-dir", str(folder / "fsdp"), "--set", "train.parallel=fsdp")
    assert "2 x cpu, grad accumulation 1" in out.stdout
    return folder


def test_fsdp_two_ranks_match_one_process(runs):
    """Bit-identical weights after 4 steps: 2 FSDP ranks x micro-batch 2 vs 1 process accumulating 2 of them.

    Each rank's gradient is the one process's micro-batch gradient (the same kernels on the same rows), the
    reduce-scatter sums two halves (exact, as accumulating them), and AdamW is elementwise. Grad clipping
    is off here: the norm of sharded gradients is summed in another order, so it can differ in its last bit,
    which moves every clipped update by one rounding; and the key third of c_attn.bias has a gradient that
    is 0 in exact arithmetic (softmax ignores a constant added to every score), whose rounding noise Adam
    normalises into lr-sized steps: there one rounding of the norm shows as ~1e-7 (seen with clipping on).
    """
    one = ckpt.load_model(ckpt.find_latest(runs / "one")).state_dict()
    sharded = ckpt.find_latest(runs / "fsdp")
    assert (sharded / "dcp" / ".metadata").is_file() and not (sharded / ckpt.WEIGHTS_NAME).exists()
    two = ckpt.load_model(sharded).state_dict()  # consolidated on this process
    assert two.keys() == one.keys()
    for name, tensor in one.items():
        assert torch.equal(two[name], tensor), name
    assert read_metrics(runs / "fsdp") == read_metrics(runs / "one")
    assert loader_tokens(runs / "fsdp") == loader_tokens(runs / "one") == 4 * 128


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_rank_sharded_checkpoint_resumes_on_one_process(runs, tmp_path, parallel):
    """Saved by 2 FSDP ranks at step 2, resumed by 1 process (sharded, or plain as under DDP): losses of steps 3-4
    and the loader's position equal the uninterrupted one-process run's (the same token stream)."""
    run = keep_only(runs / "fsdp", 2, tmp_path / "run")
    assert main(["train", "--resume", str(run), "--set", f"train.parallel={parallel}"]) == 0
    assert read_metrics(run) == read_metrics(runs / "one")
    assert loader_tokens(run) == loader_tokens(runs / "one")
    assert (ckpt.find_latest(run) / ckpt.WEIGHTS_NAME).is_file() == (parallel == "ddp")


@pytest.mark.parametrize("source", ["one", "one-fsdp"])
def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(runs, tmp_path, source):
    """A 1-process checkpoint at step 2 (DDP's plain one, or FSDP's DCP one written by a single rank), resumed
    under FSDP on 2 ranks: steps 3-4 as FSDP's own run.

    With the gathered weights kept from forward to backward (ZeRO-2-like; the same numbers), the last
    checkpoint written in the background (async_save: named once written, before the run ends), and samples
    after step 3 (every rank generates, rank 0 prints), which must leave step 4 as it was."""
    assert (ckpt.find_latest(runs / source) / "dcp" / ".metadata").is_file() == (source == "one-fsdp")
    run = keep_only(runs / source, 2, tmp_path / "run")
    sets = ["train.parallel=fsdp", "train.reshard_after_forward=false", "train.async_save=true",
            "eval.sample_every=3", "eval.sample_tokens=4"]  # fmt: skip
    out = torchrun("train", "--resume", str(run), *[a for s in sets for a in ("--set", s)])
    assert out.stdout.count("sample 0: Hello, I'm a language model,") == 2  # after steps 3 and 4, once
    assert read_metrics(run) == read_metrics(runs / "fsdp")
    assert loader_tokens(run) == loader_tokens(runs / "fsdp")
    assert (ckpt.find_latest(run) / "dcp" / ".metadata").is_file()


def test_consolidate_writes_a_plain_checkpoint(runs, tmp_path, capsys):
    assert main(["consolidate", str(runs / "fsdp"), str(tmp_path / "plain")]) == 0
    assert "wrote" in capsys.readouterr().out
    plain = ckpt.load_state_dict(tmp_path / "plain" / ckpt.WEIGHTS_NAME)
    expected = ckpt.load_model(ckpt.find_latest(runs / "one")).state_dict()
    assert plain.keys() == expected.keys() and all(torch.equal(plain[k], v) for k, v in expected.items())
    assert "train_state" not in ckpt.read_json(tmp_path / "plain" / ckpt.CONFIG_NAME)
    assert main(["consolidate", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
