"""`gpt2lab ablate BASE.toml --variant ...`: each variant trained beside the base, resumable, then compared."""

from __future__ import annotations

import shutil

import pytest

from gpt2lab.cli.main import main
from gpt2lab.errors import Gpt2LabError
from gpt2lab.train.ablate import parse_variant
from tests.conftest import REPO
from tests.train.test_loop import read_metrics, shakespeare_data  # noqa: F401 (a fixture)

TINY_SETS = {
    "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
    "train.max_steps": 4, "train.total_batch": 256, "train.micro_batch": 4, "train.save_every": 2,
    "train.device": "cpu", "optim.warmup_steps": 1, "eval.val_every": 2, "eval.val_batches": 2,
    "eval.sample_every": 0, "log.tensorboard": "false",
}  # fmt: skip


def ablate(capsys, data, runs_dir, *variants: str, sets: dict | None = None) -> tuple[int, str, str]:
    argv = ["ablate", str(REPO / "configs" / "shakespeare.toml"), "--runs-dir", str(runs_dir)]
    for key, value in {**TINY_SETS, "data.path": data, **(sets or {})}.items():
        argv += ["--set", f"{key}={value}"]
    for variant in variants:
        argv += ["--variant", variant]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_ablation_trains_each_run_skips_finished_ones_resumes_the_rest(tmp_path, shakespeare_data, capsys):  # noqa: F811
    runs = tmp_path / "abl"
    code, out, err = ablate(capsys, shakespeare_data, runs, "x0:model.x0_skip=true,optim.lr=2e-3")
    assert code == 0, err
    assert "== ablate 1/2 base: the base config" in out and "== ablate 2/2 x0: " in out
    for name in ("base", "x0"):
        assert (runs / name / "checkpoints" / "step_0000004").is_dir()
    table = out[out.index("target: base's final val loss") :].splitlines()
    base_val = read_metrics(runs / "base", "val_loss")[4]
    assert table[0].startswith(f"target: base's final val loss {base_val:.4f}")
    base_row, x0_row = table[2].split(), table[3].split()
    assert base_row[:3] == ["base", base_row[1], f"{base_val:.4f}"] and base_row[5:7] == ["1.0k", "1.00"]
    assert x0_row[0] == "x0" and x0_row[2] == f"{read_metrics(runs / 'x0', 'val_loss')[4]:.4f}"
    assert "model.x0_skip=True, optim.lr=0.002" in table[3]
    assert (runs / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logs = {name: (runs / name / "metrics.jsonl").stat().st_mtime_ns for name in ("base", "x0")}
    code, again, err = ablate(capsys, shakespeare_data, runs, "x0:model.x0_skip=true,optim.lr=2e-3")
    assert code == 0, err
    assert "1/2 base: finished" in again and "2/2 x0: finished" in again and "step" not in again.split("target")[0]
    assert {name: (runs / name / "metrics.jsonl").stat().st_mtime_ns for name in logs} == logs  # nothing retrained
    assert again[again.index("target:") :] == out[out.index("target:") :]  # the same table

    shutil.rmtree(runs / "x0" / "checkpoints" / "step_0000004")  # as if stopped after step 2
    code, resumed, err = ablate(capsys, shakespeare_data, runs, "x0:model.x0_skip=true,optim.lr=2e-3")
    assert code == 0, err
    assert "2/2 x0: model.x0_skip=True, optim.lr=0.002" in resumed and "(resuming)" in resumed
    assert "resuming at step 2" in resumed and (runs / "x0" / "checkpoints" / "step_0000004").is_dir()
    assert (runs / "base" / "metrics.jsonl").stat().st_mtime_ns == logs["base"]

    code, _, err = ablate(capsys, shakespeare_data, runs, "x0:model.x0_skip=true,optim.lr=3e-3")
    assert code == 2 and "abl/x0 holds a run of another config (optim.lr=0.003 differ)" in err


def test_a_bad_key_is_refused_before_any_training(tmp_path, shakespeare_data, capsys):  # noqa: F811
    runs = tmp_path / "abl"
    code, out, err = ablate(capsys, shakespeare_data, runs, "relu2:model.mlp=relu2", "typo:model.mlpp=relu2")
    assert code == 2 and not runs.exists() and "step" not in out
    assert err == "error: --variant typo: --set: unknown setting model.mlpp; did you mean model.mlp?\n"
    code, _, err = ablate(capsys, shakespeare_data, runs, "bad:model.n_head=3")
    assert code == 2 and "impossible setting" in err and "n_head" in err and not runs.exists()


def test_variant_syntax():
    assert parse_variant("moe:model.n_experts=4,model.moe_layers=0,1") == (
        "moe",
        ["model.n_experts=4", "model.moe_layers=0,1"],
    )  # a comma inside a value stays there
    assert parse_variant("a: model.mlp=relu2, optim.lr=1e-3") == ("a", ["model.mlp=relu2", "optim.lr=1e-3"])
    for bad in ("model.mlp=relu2", "name:", "base:model.mlp=relu2", "../x:model.mlp=relu2"):
        with pytest.raises(Gpt2LabError, match="--variant"):
            parse_variant(bad)


def test_the_readme_ablate_commands_load_every_variant():
    from gpt2lab.cli.main import build_parser
    from gpt2lab.train.ablate import build_variants
    from tests.test_readme import gpt2lab_argv, readme_commands

    commands = [argv for argv in map(gpt2lab_argv, readme_commands()) if argv and argv[0] == "ablate"]
    assert commands
    for argv in commands:
        args = build_parser().parse_args(argv)
        configs = build_variants(REPO / args.config, args.variant, args.set)
        assert list(configs)[0] == "base" and len(configs) == 1 + len(args.variant)
