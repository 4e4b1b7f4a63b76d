"""scripts/rl_arith.py --tool: the arith data answers through the calculator and SFT trains it as calls."""

from __future__ import annotations

import json
import tomllib

from gpt2lab.rl.arith import Arith
from tests.scripts.conftest import load_script


def test_the_rl_arith_pipeline_with_the_tool_runs_at_toy_size(tmp_path, monkeypatch):
    """On 3-digit products (--digits/--ops reach the data, the evaluations and rl.digits/rl.ops)."""
    script = load_script("rl_arith")
    argv = ["--out", str(tmp_path / "out"), "--digits", "3", "--ops", "*", "--thinking", "0", "--tool", "--n", "64",
            "--n-layer", "1", "--n-embd", "32", "--sft-steps", "2", "--rl-steps", "2", "--eval-limit", "4",
            "--set", "rl.eval_problems=2"]  # fmt: skip
    commands, run = [], script.run
    monkeypatch.setattr(script, "run", lambda *a: (commands.append(a), run(*a)))
    summary = script.pipeline(script.parse_args(argv))
    tasks = [c for c in commands if c[:2] in (("data", "arith"), ("eval", "arith"))]
    assert len(tasks) == 3 and all(" --digits 3 --ops * " in " ".join(c) for c in tasks)
    out = tmp_path / "out"
    conversations = [json.loads(line)["messages"] for line in (out / "arith.jsonl").read_text().splitlines()]
    assert conversations == Arith(digits=3, ops="*").conversations(64, tool=True)
    assert all(c[-1]["content"].startswith("<<") and ">>" in c[-1]["content"] for c in conversations)
    assert tomllib.loads((out / "sft" / "config.toml").read_text())["sft"]["calculator"] == "tool"
    rl = tomllib.loads((out / "rl" / "config.toml").read_text())["rl"]
    assert (rl["digits"], rl["ops"], rl["max_new_tokens"]) == (3, "*", 32)
    assert "<<" not in (out / "corpus.txt").read_text()  # the tokenizer learns the text the model sees
    assert summary["settings"]["tool"] is True and "| after rl |" in script.table(summary)
