"""Every RL test records the verifiers its runs start with in its own folder, never the user's cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_verifier_records(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path_factory.mktemp("cache")))
