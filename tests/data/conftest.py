"""Fixtures for the data tests: small real text, a reference tokenizer, synthetic shard folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2lab.data.shards import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, shard_name, write_shard


@pytest.fixture(scope="session")
def shakespeare_text(shared_data) -> str:
    return (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def speeches(shakespeare_text) -> list[str]:
    """Tiny Shakespeare's blank-line-separated blocks: ~7,000 short documents."""
    return [b for b in shakespeare_text.split("\n\n") if b.strip()]


@pytest.fixture(scope="session")
def ref_enc(shared_data):
    """tiktoken's own GPT-2 encoding (from the mirror's tiktoken cache): the independent reference."""
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def make_dataset(folder: Path, splits: dict[str, list[np.ndarray]]) -> Path:
    """A dataset folder from token arrays per split (shards + manifest), bypassing prepare."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "source": "test", "splits": {}}
    for split, arrays in splits.items():
        shards = []
        for i, tokens in enumerate(arrays):
            sha = write_shard(folder / shard_name(split, i), np.asarray(tokens, dtype=np.uint16))
            shards.append({"file": shard_name(split, i), "tokens": len(tokens), "sha256": sha})
        manifest["splits"][split] = {"tokens": sum(len(a) for a in arrays), "shards": shards}
    manifest["tokenizer"] = {"name": "gpt2", "vocab_size": 50257, "eot": 50256}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder
