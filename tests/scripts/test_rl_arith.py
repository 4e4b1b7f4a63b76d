"""scripts/rl_arith.py: the RL benchmark's pipeline runs end to end at toy size and reports what it measured."""

from __future__ import annotations

import json
import tomllib

from tests.scripts.conftest import load_script


def test_the_rl_arith_pipeline_runs_at_toy_size(tmp_path):
    """Data with a share of thinking, a tokenizer, a base model, SFT, eval, RL, eval, plot: every stage's output
    is there and the summary holds the evaluations (shares of 4 held-out problems)."""
    script = load_script("rl_arith")
    argv = ["--out", str(tmp_path / "out"), "--thinking", "0.5", "--n", "64", "--n-layer", "1", "--n-embd", "32",
            "--sft-steps", "2", "--rl-steps", "2", "--eval-limit", "4", "--set", "rl.eval_problems=2"]  # fmt: skip
    summary = script.pipeline(script.parse_args(argv))
    out = tmp_path / "out"
    conversations = [json.loads(line) for line in (out / "arith.jsonl").read_text().splitlines()]
    assert sum("reasoning_content" in c["messages"][-1] for c in conversations) == 32
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "rl" / "curves.png").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary
    rl = tomllib.loads((out / "rl" / "config.toml").read_text())["rl"]
    assert (rl["digits"], rl["ops"], rl["max_new_tokens"]) == (2, "+", 96)  # the defaults: 2-digit sums, as before
    for stage in ("after_sft", "after_rl"):
        assert (4 * summary[stage]["greedy"]).is_integer() and 0 <= summary[stage]["sampled"] <= 1
    assert "| after rl |" in script.table(summary)

    again = script.pipeline(script.parse_args(["--out", str(tmp_path / "again"), "--sft", str(out / "sft"), *argv[2:]]))
    assert again["after_sft"] == summary["after_sft"]  # the same SFT run, evaluated with the same seeds
    assert not (tmp_path / "again" / "sft").exists() and (tmp_path / "again" / "rl" / "curves.png").is_file()
