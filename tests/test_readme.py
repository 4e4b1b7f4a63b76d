"""The README's commands are the ones CI and users run."""

import re

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
