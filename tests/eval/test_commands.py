"""`gpt2lab eval all` and `gpt2lab bench eval`, end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np

from gpt2lab.cli.main import main
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


def test_eval_loss_reads_a_rope_model_past_its_context_with_rope_scaling(tmp_path, capsys):
    """--seq-len past block_size: a RoPE model extends (none/linear/yarn: 3 losses); learned positions refuse."""
    import torch

    from gpt2lab.checkpoint.folder import save_model
    from gpt2lab.model.config import GPTConfig
    from gpt2lab.model.gpt import GPT

    (tmp_path / "data").mkdir()
    data = make_dataset(tmp_path / "data", [np.arange(300, 300 + 64 * 4 + 1, dtype=np.uint16)])
    torch.manual_seed(0)
    rope = save_model(GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, pos_embedding="rope")).eval(),
                      tmp_path / "rope")  # fmt: skip
    losses = {}
    for scaling in ("none", "linear", "yarn"):
        out = tmp_path / f"{scaling}.json"
        args = ["eval", "loss", "--model", str(rope), "--data", str(data), "--seq-len", "64", "--rope-scaling", scaling]
        assert main([*args, "--batch-size", "2", "--json", str(out), "--device", "cpu"]) == 0
        result = json.loads(out.read_text())["loss"]
        assert result["seq_len"] == 64 and result["tokens"] == 4 * 64
        losses[scaling] = result["loss"]
    assert len({round(v, 6) for v in losses.values()}) == 3, losses  # each scaling reads the positions its own way
    learned = save_model(GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)).eval(), tmp_path / "learned")
    capsys.readouterr()
    assert main(["eval", "loss", "--model", str(learned), "--data", str(data), "--seq-len", "64"]) == 2
    assert "learned position embeddings for 16 positions" in capsys.readouterr().err
