"""`gpt2lab speedrun` at toy size, end to end: every stage runs as its command, the report card is written
from what they wrote, and a second run goes on where the first stopped."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from gpt2lab.errors import Gpt2LabError
from gpt2lab.speedrun.plan import read_plan, stages
from gpt2lab.speedrun.report import NOT_YET
from gpt2lab.speedrun.run import speedrun

REPO = Path(__file__).resolve().parents[2]
TOY = "configs/speedrun/toy.toml"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One toy speedrun, shared by the tests below (about a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("speedrun") / "toy"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        report = speedrun(TOY, out)
    return out, report


def figure_rows(report: str) -> dict[tuple[str, str], str]:
    """{(stage, figure): value} of the card's Figures table."""
    rows = re.finditer(r"^\| ([a-z]+) \| (.+?) \| (.+?) \|$", report, re.M)
    return {(m[1], m[2].strip()): m[3].strip() for m in rows if m[1] != "stage"}  # not the header


def test_the_report_card_has_every_stage_and_figure(toy_run):
    out, report_path = toy_run
    report = report_path.read_text()
    names = [s.name for s in stages(read_plan(REPO / TOY), out)]
    state = json.loads((out / "speedrun.json").read_text())
    assert list(state["stages"]) == names and state["finished"]
    for stage in names:  # each stage's wall time in the table, and its command in the by-hand block
        assert state["stages"][stage]["seconds"] > 0
        assert f"   # {stage}\n" in report
    stage_rows = re.findall(r"^\| \d+ \| .+ \| (.+) \|$", report, re.M)
    assert len(stage_rows) == len(names) and NOT_YET not in stage_rows
    rows = figure_rows(report)
    loss = json.loads((out / "eval" / "base-loss.json").read_text())["loss"]
    assert rows["pretrain", "val loss (nats per token)"] == f"{loss['loss']:.3f}"
    assert rows["pretrain", "val bits per byte (comparable across tokenizers)"] == f"{loss['bpb']:.3f}"
    assert re.fullmatch(r"\d+\.\d%", rows["pretrain", "HellaSwag acc_norm (4 examples; chance 25%)"])
    assert re.fullmatch(r"\d+\.\d{3}", rows["sft", "val loss (assistant tokens)"])
    for stage in ("sft", "rl"):
        result = json.loads((out / "eval" / f"{stage}-arith.json").read_text())
        assert rows[stage, "greedy accuracy (2 held-out problems)"] == f"{result['pass@1']:.1%}"
        assert rows[stage, "mean reward: sampled pass@1 at T = 1, 2 per problem"] == f"{result['sampled_pass@1']:.1%}"
    assert len(rows) == 12 and NOT_YET not in rows.values()


def test_the_report_shows_samples_conversation_and_curves(toy_run):
    out, report_path = toy_run
    report = report_path.read_text()
    sample = report.split("The pretrained model, from `ROMEO:`:\n\n```\n")[1].split("\n```")[0]
    assert sample.startswith("ROMEO:") and len(sample) > len("ROMEO:")
    assert report.count("> **User:** What is") == 2 and report.count("> **Assistant:** ") == 2
    for run in ("base", "sft", "rl"):
        assert (out / run / "curves.png").stat().st_size > 0 and f"![{run}]({run}/curves.png)" in report


def test_a_second_run_goes_on_where_the_first_stopped(toy_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "toy"
    shutil.copytree(toy_run[0], out)
    state = json.loads((out / "speedrun.json").read_text())
    names = list(state["stages"])
    # as if stopped during RL: its last checkpoint not yet written, the stages after it not run
    for name in names[names.index("rl") :]:
        del state["stages"][name]
    del state["finished"]
    (out / "speedrun.json").write_text(json.dumps(state))
    latest = sorted((out / "rl" / "checkpoints").iterdir())
    shutil.rmtree(latest[-1])
    before = {n: (out / "logs" / f"{n}.log").stat().st_mtime_ns for n in names[: names.index("rl")]}
    speedrun(TOY, out)
    printed = capsys.readouterr().out
    assert f"rl: continuing from {latest[-2]}" in printed
    assert "$ gpt2lab train --resume" in (out / "logs" / "rl.log").read_text()
    assert all((out / "logs" / f"{n}.log").stat().st_mtime_ns == t for n, t in before.items())  # not run again
    assert printed.count(": done before (") == len(before)
    assert json.loads((out / "speedrun.json").read_text())["finished"]


def test_another_plan_in_the_same_folder_is_refused(toy_run, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    plan = tmp_path / "plan.toml"
    plan.write_text((REPO / TOY).read_text().replace("conversations = 200", "conversations = 300"))
    with pytest.raises(Gpt2LabError, match=r"another plan \(sft.conversations: 200 then, 300 now\)"):
        speedrun(str(plan), toy_run[0])


def test_a_failed_stage_names_its_log_and_is_not_marked_done(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    plan = tmp_path / "plan.toml"
    bogus = 'source = "shakespeare"\nargs = ["--bogus"]'
    plan.write_text((REPO / TOY).read_text().replace('source = "shakespeare"', bogus))
    with pytest.raises(Gpt2LabError, match=r"stage data failed \(exit code 2\); its output is in .*logs/data.log"):
        speedrun(str(plan), tmp_path / "out")
    state = json.loads((tmp_path / "out" / "speedrun.json").read_text())
    assert list(state["stages"]) == ["tokenizer"]
    assert "unrecognized arguments: --bogus" in (tmp_path / "out" / "logs" / "data.log").read_text()
    assert "| 2 | Tokenize the corpus into shards | —" in (tmp_path / "out" / "REPORT.md").read_text()
