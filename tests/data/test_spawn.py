"""Tokenizer workers start under ``spawn`` (macOS and Windows have no fork): forced here on Linux."""

from __future__ import annotations

import multiprocessing

from gpt2lab.data.prepare import Settings, prepare
from tests.data.conftest import write_jsonl


def _shards(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def test_spawned_workers_write_the_same_shards_as_forked_ones(tmp_path, monkeypatch, shared_data, speeches):
    write_jsonl(tmp_path / "a.jsonl", speeches[:700])
    write_jsonl(tmp_path / "b.jsonl", speeches[700:1400])
    settings = Settings("files", shard_size=5000, val_tokens=2000, paths=[str(tmp_path / "*.jsonl")])
    # The spawned workers inherit nothing but the environment, and this one finds no tokenizer by itself:
    # they must load the files the main process loaded (the --mirror's), as pickled initializer arguments.
    monkeypatch.delenv("GPT2LAB_MIRROR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("gpt2lab.tokenizer.bpe._online", lambda *a, **k: False)  # the main process: no web either
    reference = prepare(settings, tmp_path / "one", mirror=shared_data, workers=1, quiet=True)
    methods = ["spawn"] + ["fork"] * ("fork" in multiprocessing.get_all_start_methods())
    for method in methods:
        manifest = prepare(settings, tmp_path / method, mirror=shared_data, workers=2, quiet=True, start_method=method)
        assert manifest["splits"] == reference["splits"]
        assert _shards(tmp_path / method) == _shards(tmp_path / "one")
    assert len(_shards(tmp_path / "one")) > 3
