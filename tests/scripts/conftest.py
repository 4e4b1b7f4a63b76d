"""Helpers for the tests of scripts/: a script is a file, not a module of the package."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.conftest import REPO


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py imported as a module, so its functions can be called and checked."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
