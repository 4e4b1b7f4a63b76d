"""The speedrun's plans: every shipped plan reads, and every stage it makes is a command gpt2lab accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from gpt2lab.cli.main import build_parser, main
from gpt2lab.errors import Gpt2LabError
from gpt2lab.speedrun.plan import read_plan, stages

REPO = Path(__file__).resolve().parents[2]
PLANS = sorted((REPO / "configs" / "speedrun").glob("*.toml"))


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # plans name their training presets from the repository root, as the README runs them


def test_the_three_plans_are_shipped():
    assert {p.stem for p in PLANS} == {"cpu", "gpu", "toy"}


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.stem)
def test_every_stage_of_every_plan_is_a_valid_gpt2lab_command(plan, tmp_path):
    todo = stages(read_plan(plan), tmp_path / "out")
    names = [s.name for s in todo]
    order = ["data", "pretrain", "eval-loss", "eval-hellaswag", "sft", "eval-sft", "rl", "eval-rl", "chat"]
    assert [n for n in names if n in order] == order  # the data flows one way: tokens, model, chatbot
    for stage in todo:
        args = build_parser().parse_args(stage.argv)  # argparse exits on a command it does not accept
        assert args.command == stage.argv[0]
        if stage.argv[0] in ("train", "sft", "rl"):
            assert shlex.split(stage.command())[:1] == ["gpt2lab"]


def test_gpu_plan_uses_gpt2s_tokenizer_and_the_124m_preset(tmp_path):
    todo = stages(read_plan(REPO / "configs/speedrun/gpu.toml"), tmp_path, nproc=8)
    assert "tokenizer" not in [s.name for s in todo]
    pretrain = next(s for s in todo if s.name == "pretrain")
    assert "configs/gpt2-124m.toml" in pretrain.argv
    assert pretrain.command().startswith("torchrun --standalone --nproc_per_node=8 -m gpt2lab train ")


def test_the_chat_stage_reads_its_questions_on_stdin(tmp_path):
    chat = stages(read_plan(REPO / "configs/speedrun/toy.toml"), tmp_path)[-1]
    assert chat.stdin == "What is 1 + 2?\n/reset\nWhat is 3 + 4?\n/reset\n"
    assert chat.command().startswith("printf '%s\\n' 'What is 1 + 2?' /reset 'What is 3 + 4?' /reset | gpt2lab chat ")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[sft]\nthinkng = 0.5\n", "unknown setting thinkng; did you mean thinking?"),
        ("[rl]\nset = 'train.max_steps=2'\n", "set must be a list of strings"),
        ("[eval]\nhellaswag_limit = 1.5\n", "hellaswag_limit must be a int"),
        ("[pretrainn]\n", "unknown section [pretrainn]; did you mean [pretrain]?"),
        ("[pretrain]\nconfig = 'configs/nope.toml'\n", "configs/nope.toml not found"),
        ("[sft]\nthinking = 2.0\n", "sft.thinking must be in [0, 1]"),
        ("[chat]\nprompts = []\n", "at least one question"),
        ("[tokenizer]\nvocab_size = 100\n", "at least 269"),
        ("[data\n", "not valid TOML"),
    ],
)
def test_a_bad_plan_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "plan.toml"
    path.write_text(text)
    with pytest.raises(Gpt2LabError) as e:
        read_plan(path)
    assert message in str(e.value)


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["speedrun", "configs/speedrun/cpu.toml", "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"gpt2lab tokenizer train shakespeare --vocab-size 1024 --out {out}/tokenizer"
    assert len(lines) == len(stages(read_plan("configs/speedrun/cpu.toml"), out))
    assert not out.exists()


def test_a_missing_plan_is_one_line(tmp_path, capsys):
    assert main(["speedrun", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "no such plan" in capsys.readouterr().err
