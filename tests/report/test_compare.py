"""`gpt2lab plot RUN RUN ...`: tokens to target, the comparison table and its two-panel PNG, on hand-made runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt2lab.cli.main import main
from gpt2lab.report.compare import cumulative_seconds, format_table, summarize, table_rows, tokens_to_target

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(folder: Path, total_batch: int, val: dict[int, float], ms: dict[int, float], lr: float = 3e-3) -> Path:
    """A run folder as `gpt2lab train` leaves it: config.toml and metrics.jsonl (no checkpoint)."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(f"[train]\ntotal_batch = {total_batch}\n\n[optim]\nlr = {lr}\n")
    records = [{"step": s, "train_loss": 9.0, "ms_per_step": m} for s, m in ms.items()]
    records += [{"step": s, "val_loss": v} for s, v in val.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    # a: 100 tokens per step, final val 5.0 at 2000 tokens: the target. b: 50 per step, crosses 5.0 between
    # (1000 tokens, 5.5) and (1500, 4.0). c: never gets there. d: logged no val loss at all.
    a = make_run(tmp_path / "a", 100, {0: 10.0, 10: 6.0, 20: 5.0}, {5: 100.0, 10: 200.0, 20: 300.0})
    b = make_run(tmp_path / "b", 50, {0: 10.0, 10: 7.0, 20: 5.5, 30: 4.0}, {30: 50.0}, lr=1e-3)
    c = make_run(tmp_path / "c", 100, {0: 10.0, 20: 8.0}, {20: 10.0})
    d = make_run(tmp_path / "d", 100, {}, {20: 10.0})
    return [a, b, c, d]


def test_tokens_to_target_interpolates_between_the_bracketing_val_points():
    val = [(0, 10.0), (1000, 7.0), (2000, 5.5), (3000, 4.0)]
    assert tokens_to_target(val, 5.0) == pytest.approx(2000 + 1000 * 0.5 / 1.5)
    assert tokens_to_target(val, 7.0) == 1000  # reached exactly at a val point
    assert tokens_to_target(val, 11.0) == 0
    assert tokens_to_target(val, 3.9) is None
    assert tokens_to_target([(0, 6.0), (100, 4.0), (200, 5.5)], 5.0) == 50  # the first crossing counts


def test_wall_time_adds_each_record_ms_per_step_over_the_steps_since_the_last(runs):
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert cumulative_seconds(records) == [(0, 0.0), (5, 0.5), (10, 1.5), (20, 4.5)]
    a = summarize(runs[0])
    assert a.val == [(0, 10.0), (1000, 6.0), (2000, 5.0)] and a.val_seconds == [0.0, 1.5, 4.5]
    assert (a.tokens, a.wall_s, a.final_val) == (2000, 4.5, 5.0)


def test_the_table_measures_every_run_against_the_first_runs_final_val_loss(runs):
    rows = {r["run"]: r for r in table_rows([summarize(r) for r in runs])}
    assert rows["a"]["tokens to target"] == "2.0k" and rows["a"]["ratio"] == "1.00"
    assert rows["b"]["tokens to target"] == "1.2k" and rows["b"]["ratio"] == "0.58"  # 1166.7 / 2000
    assert rows["b"]["final val"] == "4.0000" and rows["b"]["tokens"] == "1.5k" and rows["b"]["wall"] == "1.5s"
    assert rows["b"]["config"] == "train.total_batch=50, optim.lr=0.001"  # what differs from the first run
    assert rows["c"]["tokens to target"] == "not reached" and rows["c"]["ratio"] == "-"
    assert rows["d"]["final val"] == "no val loss" and rows["d"]["tokens to target"] == "no val loss"
    assert rows["a"]["commit"] == "-" and rows["a"]["config"].endswith("config.toml")


def test_a_first_run_without_val_loss_is_reported_not_a_crash(runs):
    text = format_table([summarize(runs[3]), summarize(runs[0])])
    assert "no target: d logged no val loss" in text
    assert text.splitlines()[-1].split()[:2] == ["a", "-"]


def test_plot_several_runs_prints_the_table_and_draws_two_panels(runs, tmp_path, capsys):
    from gpt2lab.report.plot import compare_figure

    out = tmp_path / "cmp" / "compare.png"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "target: a's final val loss 5.0000" in stdout and "tokens to target" in stdout
    assert [line.split()[0] for line in stdout.splitlines()[2:6]] == ["a", "b", "c", "d"]
    assert out.read_bytes()[:8] == PNG
    fig = compare_figure([summarize(r) for r in runs])
    by_tokens, by_time = fig.axes
    assert len(fig.axes) == 2
    curves = {line.get_label(): line for line in by_tokens.get_lines()}
    assert set(curves) == {"a", "b", "c", "a final"}  # d has no val points; the target line
    assert list(curves["b"].get_xdata()) == [0, 500, 1000, 1500]
    assert list({line.get_label(): line for line in by_time.get_lines()}["a"].get_xdata()) == [0.0, 1.5, 4.5]


def test_plot_one_run_draws_its_curves_not_a_comparison(runs, capsys):
    assert main(["plot", str(runs[0])]) == 0
    assert "tokens to target" not in capsys.readouterr().out
    assert (runs[0] / "curves.png").read_bytes()[:8] == PNG


def _log(run: Path, *records: dict) -> None:
    with (run / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_plot_one_run_draws_only_the_panels_it_logged(runs, tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    titles, savefig = [], matplotlib.figure.Figure.savefig

    def keep_titles(fig, *args, **kwargs):  # the figure as drawn, whatever function draws it
        titles.append([ax.get_title() for ax in fig.axes if ax.get_title()])
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_titles)
    run = runs[0]  # train and val loss only
    assert main(["plot", str(run)]) == 0 and titles[-1] == ["loss"]
    _log(run, {"step": 5, "lr": 1e-3, "tokens_per_s": 1000.0, "mfu": 0.1})  # no HellaSwag: no empty panel for it
    assert main(["plot", str(run)]) == 0 and titles[-1] == ["loss", "learning rate", "throughput"]
    _log(run, {"step": 20, "hellaswag": 0.3})
    assert main(["plot", str(run)]) == 0 and titles[-1] == ["loss", "HellaSwag", "learning rate", "throughput"]
    rl = tmp_path / "rl"
    rl.mkdir()
    _log(rl, {"step": 1, "reward": 0.5, "completion_len": 9.0, "tokens_per_s": 10.0})
    assert main(["plot", str(rl)]) == 0 and titles[-1] == ["reward", "completion length", "throughput"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert main(["plot", str(empty)]) == 2 and "nothing logged yet" in capsys.readouterr().err


def test_a_folder_that_is_not_a_run_is_one_clear_error(runs, tmp_path, capsys):
    assert main(["plot", str(runs[0]), str(tmp_path)]) == 2
    assert "is it a run folder of `gpt2lab train`?" in capsys.readouterr().err


def test_config_changes_leave_out_a_presets_reference_figures():
    """Two presets' [reference] sections differ (their recorded results), but they are not settings of the runs."""
    from gpt2lab.report.compare import config_changes

    ours = {"model": {"mlp": "relu2"}, "reference": {"tokens_per_s": 10.0}}
    base = {"model": {"mlp": "gelu"}, "reference": {"tokens_per_s": 1070.0}}
    assert config_changes(ours, base) == ["model.mlp=relu2"]
