"""The README's commands are the ones CI and users run."""

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO


def _section(name: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- section:{name} -->\s*```bash\n(.*?)\n```", text, re.S)
    assert m, f"README.md has no bash block in section {name}"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert _section("test-command") in ci


def test_readme_setup_pins_the_cpu_torch_wheel():
    for name in ("main-command", "test-command"):
        assert "torch==2.13.0" in _section(name)


# ----------------------------------------------------------------------------- every command, as written

FENCE = re.compile(r"```bash\n(.*?)\n```", re.S)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # the map and the tour


def pages_text() -> str:
    return "\n".join(page.read_text() for page in PAGES)


def readme_commands() -> list[str]:
    """Every command of the bash blocks of the README and docs/: continuations joined, comments dropped, `&&` chains
    split."""
    commands = []
    for block in FENCE.findall(pages_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def gpt2lab_argv(command: str) -> list[str] | None:
    """The gpt2lab arguments of `gpt2lab ...`, `python -m gpt2lab ...` or `torchrun ... -m gpt2lab ...`."""
    words = shlex.split(command)
    if words[:1] == ["gpt2lab"]:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i : i + 2] == ["-m", "gpt2lab"]:
            return words[i + 2 :]
    return None


def test_the_readme_has_gpt2lab_commands_to_check():
    assert sum(gpt2lab_argv(c) is not None for c in readme_commands()) >= 30


def test_every_readme_command_parses_and_its_config_loads(monkeypatch):
    """Each gpt2lab command of the README is accepted by the real parser; train's CONFIG + --set load, and
    speedrun's plan."""
    from gpt2lab.cli.main import build_parser
    from gpt2lab.config import load_config
    from gpt2lab.speedrun.plan import read_plan

    monkeypatch.chdir(REPO)
    parser = build_parser()
    for command in readme_commands():
        argv = gpt2lab_argv(command)
        if argv is None or "--help" in argv or "--version" in argv:
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README command rejected by the parser: {command}") from None
        if args.command == "train" and args.config:
            load_config(REPO / args.config, args.set)  # an unknown --set key or a bad value raises here
        if args.command == "bench" and getattr(args, "config", None):
            load_config(REPO / args.config, getattr(args, "set", None) or [])
        if args.command == "speedrun":
            read_plan(args.plan)  # its keys, types and training preset (a path from the repository root)


def _kept_steps(preset: Path) -> set[int]:
    """The checkpoint steps a finished run of this preset still holds."""
    train = tomllib.loads(preset.read_text())["train"]
    max_steps, every, keep = train["max_steps"], train.get("save_every", 1000), train.get("keep_checkpoints", 3)
    saved = sorted({s for s in range(every, max_steps + 1, every)} | {max_steps}) if every else [max_steps]
    return set(saved[-keep:] if keep else saved)


def test_readme_checkpoint_paths_are_ones_the_preset_keeps():
    text = pages_text()
    paths = re.findall(r"runs/([\w-]+)/checkpoints/step_(\d+)", text)
    assert paths, "the README names no checkpoint folder (update this test if that is intended)"
    for name, step in paths:
        preset = REPO / "configs" / f"{name}.toml"
        assert preset.is_file(), f"README names runs/{name}/ but configs/{name}.toml does not exist"
        assert int(step) in _kept_steps(preset), f"runs/{name}/checkpoints/step_{step} is not kept by {preset.name}"


def test_readme_config_files_exist():
    for path in set(re.findall(r"configs/[\w./-]+\.toml", pages_text())):
        assert (REPO / path).is_file(), f"README names {path}, which does not exist"


# The commands cheap enough to run as written on every CI run, in README order (each after the ones above it).
CHEAP = (
    "gpt2lab data prepare shakespeare --out data/shakespeare",
    "gpt2lab data info data/shakespeare",
    'python -c "from gpt2lab.model import GPT, GPTConfig; from gpt2lab.checkpoint.folder import save_model;',
    "gpt2lab sample --model runs/random-gpt2 ",
    "gpt2lab export runs/random-gpt2 runs/random-gpt2-hf",
    "gpt2lab export runs/random-gpt2 runs/random-gpt2.gguf --format gguf",
    'python -c "from transformers import GPT2LMHeadModel',
)


def test_cheap_readme_commands_run_as_written(tmp_path, shared_data):
    """The set-up-free commands of the README run in a fresh folder, in order, and exit 0."""
    chosen = [c for c in readme_commands() if c.startswith(CHEAP)]
    assert len({next(p for p in CHEAP if c.startswith(p)) for c in chosen}) == len(CHEAP), (
        "a cheap command left the README"
    )
    env = {**os.environ, "GPT2LAB_MIRROR": str(shared_data), "OMP_NUM_THREADS": "1"}
    python_api = re.search(r"### Python API\s*```python\n(.*?)\n```", pages_text(), re.S)
    assert python_api, "README has no Python API snippet"
    done = set()
    for command in chosen:
        if command in done:  # e.g. `data prepare shakespeare` appears in several sections
            continue
        done.add(command)
        out = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"README command failed: {command}\n{out.stderr[-2000:]}"
        if command.startswith("gpt2lab export"):  # the Python API snippet uses the model saved above it
            api = subprocess.run([sys.executable, "-c", python_api.group(1)], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
            assert api.returncode == 0, f"README Python API snippet failed:\n{api.stderr[-2000:]}"


# ----------------------------------------------------------------------------- what the commands write, and link

WRITE_FLAGS = ("--out", "--run-dir", "--out-dir", "--runs-dir")


def written_paths(command: str) -> list[str]:
    """The relative paths a README command writes into: the value of an output flag, or export's OUT_DIR."""
    words = shlex.split(command)
    paths = [words[i + 1] for i in range(len(words) - 1) if words[i] in WRITE_FLAGS]
    argv = gpt2lab_argv(command)
    if argv and argv[0] == "export" and len(argv) > 2:
        paths.append(argv[2])
    return [p for p in paths if not p.startswith(("/", "$", "~"))]


def test_git_ignores_every_folder_the_readme_commands_write_into():
    """A user who runs the README's commands in the clone sees a clean `git status`."""
    paths = sorted({p for c in readme_commands() for p in written_paths(c)})
    assert {"tok/gutenberg-16k", "runs/chat", "data/shakespeare"} <= set(paths)  # the extraction finds them
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    ignored = set(out.stdout.split())
    assert ignored == set(paths), f"README commands write into paths git does not ignore: {set(paths) - ignored}"


def test_every_image_the_docs_link_exists_in_the_repository():
    pages = PAGES
    links = [(page, link) for page in pages for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text())]
    assert links, "the docs link no image (update this test if that is intended)"
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split())
    for page, link in links:
        path = (page.parent / link).resolve().relative_to(REPO).as_posix()
        assert path in tracked, f"{page.name} shows {link}, which is not in the repository"


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped (hyphens kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_to_a_section_names_a_heading_that_exists():
    pages = {p.name: p.read_text() for p in [REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md")]}
    anchors = {name: {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)} for name, text in pages.items()}
    links = [(name, m) for name, text in pages.items() for m in re.findall(r"\]\(([\w./-]*)#([\w-]+)\)", text)]
    assert len(links) > 5
    for name, (target, anchor) in links:
        target_name = Path(target).name if target else name
        assert anchor in anchors[target_name], f"{name} links to {target or name}#{anchor}, which has no such heading"


def test_the_first_screens_sample_command_prints_no_warning(tmp_path, shared_data):
    """The zero-to-chatbot `gpt2lab sample`, on a model of its preset's shape, writes nothing to stderr."""
    import torch

    from gpt2lab.checkpoint.folder import save_model
    from gpt2lab.config import load_config
    from gpt2lab.model.gpt import GPT

    command = next(c for c in _section("main-command").splitlines() if c.startswith("gpt2lab sample"))
    command = re.sub(r"\s+#\s.*$", "", command)
    run = shlex.split(command)[shlex.split(command).index("--model") + 1]  # runs/shakespeare
    torch.manual_seed(0)
    save_model(GPT(load_config(REPO / "configs" / f"{Path(run).name}.toml").model), tmp_path / run)
    env = {**os.environ, "GPT2LAB_MIRROR": str(shared_data), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ROMEO:"), out.stderr
    assert out.stderr == "", f"the README's sample command warns: {out.stderr}"
