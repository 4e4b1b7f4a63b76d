"""`gpt2lab eval all` and `gpt2lab bench eval`, end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np

from gpt2lab.cli import main
from tests.eval.test_loss import make_dataset


def test_eval_all_runs_every_benchmark_and_writes_json(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    make_dataset(data, [np.arange(200, 200 + 16 * 4 + 1, dtype=np.uint16)])
    out = tmp_path / "results.json"
    args = ["eval", "all", "--model", str(tiny_checkpoint), "--data", str(data), "--seq-len", "16"]
    args += ["--limit", "3", "--limit-lines", "4", "--batch-size", "2", "--json", str(out), "--device", "cpu"]
    code = main(args)
    assert code == 0
    results = json.loads(out.read_text())
    assert results["hellaswag"]["count"] == 3 and results["lambada"]["count"] == 3
    assert results["wikitext2"]["stride"] == 128  # the default 512, capped at the model's 128-token context
    assert results["loss"]["tokens"] == 4 * 16
    printed = capsys.readouterr().out
    assert "Summary" in printed and "loss ppl" in printed


def test_eval_loss_needs_a_dataset(tiny_checkpoint, tmp_path, capsys):
    assert main(["eval", "loss", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err


def test_bench_eval_prints_the_three_modes(tiny_checkpoint, capsys):
    assert main(["bench", "eval", "--model", str(tiny_checkpoint), "--limit", "2", "--batch-size", "2",
                 "--device", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for mode in ("one candidate per forward", "one example per forward", "batched: 2 examples per forward"):
        assert mode in out
