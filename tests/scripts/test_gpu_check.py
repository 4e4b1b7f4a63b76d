"""scripts/gpu_check.py: the GPU path's check script works, and its comparisons catch a real difference.

On a CPU it runs with --quick (toy models, no CUDA graph): the same commands and checks as on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO
from tests.scripts.conftest import load_script

SCRIPT = REPO / "scripts" / "gpu_check.py"


def test_the_check_script_passes_on_a_toy_run(tmp_path):
    """Train, torchrun + resume and FSDP on the same curve, HellaSwag, decoding modes: every line PASS, exit 0."""
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    prepare = [sys.executable, "-m", "gpt2lab", "data", "prepare", "shakespeare", "--out", str(data)]
    subprocess.run(prepare, check=True, capture_output=True, env=env)
    cmd = [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(tmp_path / "out"), "--quick"]
    proc = subprocess.run([*cmd, "--only", "gpt2", "--hellaswag-limit", "8"], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(lines) == 7 and all(line.startswith("PASS") for line in lines), lines
    assert "resume continues the curve" in proc.stdout and "FSDP2 (bf16 mixed precision on CUDA)" in proc.stdout


def test_the_comparisons_fail_on_a_real_difference(tmp_path, capsys):
    check = load_script("gpu_check")
    c = check.Checks(tmp_path)
    curve = {s: 10.0 - 0.1 * s for s in range(1, 31)}
    check.same_curve(c, "same", dict(curve), curve, range(16, 31))
    check.same_curve(c, "restarted", {s: v + (0.3 if s > 15 else 0) for s, v in curve.items()}, curve, range(16, 31))
    check.loss_goes_down(c, "flat", {s: 10.0 + 0.01 * (s % 2) for s in range(1, 9)})
    check.same_tokens(c, "one token off", {"eager": "The meaning of life is a", "graph": "The meaning of life is b"})
    assert [r["pass"] for r in c.results] == [True, False, False, False]
    assert capsys.readouterr().out.count("FAIL") == 3
