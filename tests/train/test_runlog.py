"""metrics.jsonl across stops: a partial last line (kill -9 mid-write), a new run, a resume."""

from __future__ import annotations

import json

import pytest

from gpt2lab.cli.main import main
from gpt2lab.errors import Gpt2LabError
from gpt2lab.train.runlog import MetricsLog
from tests.train.test_loop import shakespeare_data, write_config  # noqa: F401 (fixtures)

PARTIAL = '{"step": 5, "train_loss": 3.1'  # what a kill in the middle of log() leaves behind


def _write_log(run_dir, steps: range, tail: str = "") -> None:
    lines = "".join(json.dumps({"step": s, "train_loss": 10.0 - s}) + "\n" for s in steps)
    (run_dir / "metrics.jsonl").write_text(lines + tail)


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_partial_last_line_is_dropped_on_resume(tmp_path, capsys):
    _write_log(tmp_path, range(1, 5), PARTIAL)
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=4)
    log.log(5, train_loss=5.0)
    log.close()
    assert _steps(tmp_path) == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 5, "train_loss": 5.0}
    err = capsys.readouterr().err
    assert "dropped a partial last line" in err and err.count("\n") == 1


def test_records_after_the_checkpoint_are_dropped_and_a_whole_log_is_kept(tmp_path, capsys):
    from gpt2lab.train.runlog import read_records

    _write_log(tmp_path, range(1, 7))
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=4).close()
    assert _steps(tmp_path) == [1, 2, 3, 4]
    assert capsys.readouterr().err == ""  # nothing was dropped for being partial


def test_an_unreadable_line_before_the_last_is_a_clear_error(tmp_path):
    _write_log(tmp_path, range(1, 3), "garbage\n" + json.dumps({"step": 3}) + "\n")
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(Gpt2LabError, match=r"metrics.jsonl, line 3: not a metrics record"):
        MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # the log is left as it was


def test_a_new_run_starts_the_log_afresh(tmp_path):
    """A run that never saved a checkpoint, started again in its folder: no old records mixed in."""
    _write_log(tmp_path, range(1, 4), PARTIAL)
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=None)
    log.log(1, train_loss=9.5)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "train_loss": 9.5}\n'


def test_resume_after_a_kill_in_the_middle_of_a_log_write(tmp_path, shakespeare_data, capsys):  # noqa: F811
    cfg = write_config(tmp_path, shakespeare_data, eval={"val_every": 0})  # 4 steps, a checkpoint every 2
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write(PARTIAL)  # as if killed while logging step 5
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=6"]) == 0
    assert "dropped a partial last line" in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]  # step 5 once, whole
