"""constraints.txt, the lock the README's commands install from, covers every dependency pyproject.toml names."""

from __future__ import annotations

import re
import tomllib

from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.conftest import REPO


def locked() -> dict[str, list[tuple[str, str]]]:
    """{normalised name: [(version, environment marker or "")]}: one line per platform the lock forks on."""
    pins: dict[str, list[tuple[str, str]]] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            m = re.fullmatch(r"([\w.-]+)==([^\s;]+)\s*(?:;\s*(.*))?", line.strip())
            assert m, f"constraints.txt: not a pin: {line!r}"
            pins.setdefault(_norm(m.group(1)), []).append((m.group(2), m.group(3) or ""))
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + [r for group in extras.values() for r in group]]


def test_every_declared_dependency_is_pinned_to_a_version_it_allows():
    pins, requirements = locked(), declared()
    assert len(requirements) > 15
    for req in requirements:
        assert _norm(req.name) in pins, f"{req.name} is in pyproject.toml but not in constraints.txt: refresh the lock"
        for version, _ in pins[_norm(req.name)]:
            assert req.specifier.contains(version, prereleases=True), f"the lock's {req.name}=={version} breaks {req}"


def test_the_lock_pins_the_readmes_torch_and_one_version_per_platform():
    pins = locked()
    assert pins["torch"] == [("2.13.0", "")]
    env = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
           "platform_machine": "x86_64", "implementation_name": "cpython", "platform_system": "Linux"}  # fmt: skip
    for name, lines in pins.items():  # forks by platform never leave two versions on one machine
        here = [v for v, marker in lines if not marker or Marker(marker).evaluate(env)]
        assert len(here) <= 1, f"constraints.txt pins {name} twice for Linux x86-64, Python 3.11: {here}"
