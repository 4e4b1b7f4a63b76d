"""RL settings refused before any work, and what a resumed RL run may import."""

from __future__ import annotations

import json

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.cli.main import main
from tests.rl.test_rl import SETS, _chat_model, _task


def test_rl_under_fsdp_is_refused_with_one_line_before_any_work(tmp_path, capsys):
    _chat_model(tmp_path / "chat")
    args = ["rl", "--model", str(tmp_path / "chat"), "--task", "arith", "--run-dir", str(tmp_path / "run")]
    assert main([*args, "--set", "train.parallel=fsdp"]) == 2
    err = capsys.readouterr().err
    assert "rl with train.parallel=fsdp is not supported yet: use ddp (the default)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def _rl_run(tmp_path, steps: int = 2) -> tuple[list[str], object]:
    """A finished RL run (tmp_path / "run") whose verifier is tmp_path / "odd.py"; the args that continue it."""
    _chat_model(tmp_path / "policy")
    args = ["rl", "--model", str(tmp_path / "policy"), "--task", _task(tmp_path), "--run-dir", str(tmp_path / "run")]
    args += ["--set", f"rl.verifier={tmp_path / 'odd.py'}:reward"]
    for s in SETS:
        args += ["--set", s.replace("max_steps=4", f"max_steps={steps}").replace("save_every=2", "save_every=1")]
    assert main(args) == 0
    return ["train", "--resume", str(tmp_path / "run"), "--set", f"train.max_steps={steps + 1}"], tmp_path / "run"


def test_a_resume_imports_the_saved_verifier_only_if_named_again_or_unchanged(tmp_path, capsys):
    resume, run = _rl_run(tmp_path)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef reward(answer, reference):\n    return 1.0\n")
    config = run / "checkpoints" / "step_0000002" / ckpt.CONFIG_NAME
    saved = json.loads(config.read_text())
    saved[ckpt.TRAIN_STATE_KEY]["config"]["rl"]["verifier"] = f"{evil}:reward"  # someone else's run folder
    config.write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert f"the saved config names the verifier {evil}:reward" in err and "no run of yours started with" in err
    assert f"resume with --set rl.verifier={evil}:reward" in err
    assert "Traceback" not in err and not marker.exists()  # refused before importing it
    assert main([*resume, "--set", f"rl.verifier={evil}:reward"]) == 0  # named again: the user trusts it
    assert marker.read_text() == "ran" and (run / "checkpoints" / "step_0000003").is_dir()


def test_a_resume_imports_the_verifier_it_started_with_while_its_file_is_unchanged(tmp_path, capsys):
    resume, run = _rl_run(tmp_path)
    odd = tmp_path / "odd.py"
    original = odd.read_text()
    odd.write_text(original + "# edited\n")  # changed since the run started
    capsys.readouterr()
    assert main(resume) == 2
    assert "no run of yours started with that file as it is now" in capsys.readouterr().err
    odd.write_text(original)
    assert main(resume) == 0 and (run / "checkpoints" / "step_0000003").is_dir()


def test_a_verifier_module_is_hashed_from_its_file_without_importing_it(tmp_path, monkeypatch):
    import hashlib
    import sys

    from gpt2lab.rl.tasks import verifier_sha256

    package = tmp_path / "graders"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(tmp_path / 'pkg')!r}, 'w')\n")
    (package / "exact.py").write_text(f"open({str(tmp_path / 'mod')!r}, 'w')\ndef reward(a, r):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    digest = hashlib.sha256((package / "exact.py").read_bytes()).hexdigest()
    assert verifier_sha256("graders.exact:reward") == digest
    assert verifier_sha256(f"{package / 'exact.py'}:reward") == digest
    assert verifier_sha256("graders.missing:reward") == "" and verifier_sha256("no_such_module:f") == ""
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "mod").exists() and "graders" not in sys.modules
