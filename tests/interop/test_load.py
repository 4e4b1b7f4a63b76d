"""`--model` resolution for run folders without a checkpoint yet, and the package's import graph."""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path

import pytest

import gpt2lab
from gpt2lab.cli.main import main
from tests.train.test_loop import shakespeare_data, write_config  # noqa: F401 (fixtures)

SRC = Path(gpt2lab.__file__).parent  # the package under test, wherever it is installed


def _error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_run_folder_without_a_checkpoint_says_how_to_restart_it(tmp_path, shakespeare_data, capsys):  # noqa: F811
    cfg = write_config(tmp_path, shakespeare_data, train={"max_steps": 2}, eval={"val_every": 0})
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    # what a run stopped before its first save leaves: config.toml, metrics.jsonl, maybe a half-written save
    for step in (run / "checkpoints").iterdir():
        step.rename(run / "checkpoints" / f".tmp_{step.name}_x")
    for argv in (["sample", "--model", run], ["export", run, tmp_path / "hf"]):
        err = _error(capsys, *argv)
        assert f"{run}: a run folder without a checkpoint yet" in err and "or remove the folder" in err
    command = err.split("`")[1]
    assert command == f"gpt2lab train {run / 'config.toml'} --run-dir {run}"
    assert command in _error(capsys, "train", "--resume", run)  # resuming it says the same
    assert main(shlex.split(command)[1:]) == 0  # the command it gives restarts the run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2]  # the log started afresh too
    capsys.readouterr()
    assert main(["sample", "--model", str(run), "--max-new-tokens", "2", "--seed", "0"]) == 0

    bare = tmp_path / "bare"  # only a log: still recognised as a run folder, no config to point at
    bare.mkdir()
    (bare / "metrics.jsonl").write_text("")
    assert f"gpt2lab train CONFIG --run-dir {bare}`" in _error(capsys, "sample", "--model", bare)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The gpt2lab modules a file imports, at module level or inside functions (not under `if TYPE_CHECKING:`,
    which never runs: a type named in an annotation, e.g. moe.py's GPTConfig, is no import)."""
    found = set()
    tree = ast.parse(path.read_text())
    guards = [node for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    type_only = {id(n) for guard in guards for n in ast.walk(guard)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or through others (size > 1)."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    groups = {frozenset({m} | {n for n in reachable[m] if m in reachable[n]}) for m in graph}
    return [set(g) for g in groups if len(g) > 1]


def test_no_module_imports_one_that_imports_it_back():
    files = {".".join(f.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in SRC.rglob("*.py")}  # fmt: skip
    graph = {name: _imports(f, set(files)) - {name} for name, f in files.items()}
    assert "gpt2lab.interop.load" not in graph["gpt2lab.interop.hf"]  # data flows one way: loading -> hf
    cycles = sorted(sorted(c) for c in _cycles(graph))
    assert not cycles, f"modules that import each other (lazily counts too): {cycles}"


HUB_IDS = ["openai-community/gpt2", "Qwen/Qwen3-0.6B", "gpt2", "HuggingFaceTB/SmolLM2-135M"]
LOCAL = ["runs/nonexistent", "runs/a/b", "./model", "../model", "/no/such/model", "~/no-such-model-x", "a/b/c",
         "my model/x", "runs\\x", "a--b/c"]  # fmt: skip


def test_a_path_that_does_not_exist_says_no_such_folder_and_never_asks_the_hub(tmp_path, monkeypatch):
    from gpt2lab.errors import Gpt2LabError
    from gpt2lab.interop import load as loading

    asked = []

    def download(repo_id):  # the hub, offline: what the user met before
        asked.append(repo_id)
        raise Gpt2LabError(f"could not fetch {repo_id!r} from the Hugging Face hub")

    monkeypatch.setattr(loading, "download", download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # `runs/...` names a folder under it, not a hub repository
    for spec in LOCAL:
        with pytest.raises(Gpt2LabError) as e:
            loading.resolve(spec)
        where = Path(spec).expanduser().resolve()  # where it looked, as an absolute path
        assert str(e.value).startswith(f"{spec}: no such folder") and str(where) in str(e.value), str(e.value)
    assert asked == []
    for spec in HUB_IDS:  # hub-shaped names still go to the hub
        with pytest.raises(Gpt2LabError, match="could not fetch"):
            loading.resolve(spec)
    assert asked == HUB_IDS


def test_the_cli_says_which_folder_it_looked_for_in_one_line(tmp_path, monkeypatch, capsys):
    from gpt2lab.interop import load as loading

    monkeypatch.setattr(loading, "download", lambda repo_id: pytest.fail(f"asked the hub for {repo_id}"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    err = _error(capsys, "sample", "--model", "runs/nonexistent")
    assert err == f"error: runs/nonexistent: no such folder (looked for {tmp_path / 'runs' / 'nonexistent'})\n"
