"""An interrupted prepare (stopped after shard k, or a tokenizer worker killed) resumes to byte-identical shards."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from gpt2lab.data import encode, sources
from gpt2lab.data.prepare import STATE, Settings, prepare
from gpt2lab.errors import Gpt2LabError
from tests.data.conftest import write_jsonl


def _done_shards(out: Path) -> int:
    state = out / STATE
    return sum(len(s["shards"]) for s in json.loads(state.read_text())["splits"].values()) if state.exists() else 0


def _interrupting_source(out: Path, after: int, action, name: str = "files"):
    """A real source, but calling ``action()`` once ``after`` shards are complete."""
    real = sources.SOURCES[name]

    def documents(opts):
        fired = False
        for doc in real.documents(opts):
            if not fired and _done_shards(out) >= after:
                fired = True
                action()
            yield doc

    return sources.Source(name, documents, real.help, real.shard_size)


def _files_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, speeches):
    folder = tmp_path_factory.mktemp("corpus")
    write_jsonl(folder / "a.jsonl", speeches[:1500])
    write_jsonl(folder / "b.jsonl", speeches[1500:3000])
    return folder


@pytest.fixture(scope="module")
def settings(corpus) -> Settings:
    return Settings("files", shard_size=4000, val_tokens=3000, paths=[str(corpus / "*.jsonl")])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, settings):
    out = tmp_path_factory.mktemp("ref")
    prepare(settings, out, workers=1, quiet=True)
    return out


def test_stop_after_shard_k_then_resume(tmp_path, monkeypatch, settings, reference, capsys):
    out = tmp_path / "ds"

    def stop():
        raise KeyboardInterrupt  # Ctrl-C in the middle of the stream

    monkeypatch.setitem(sources.SOURCES, "files", _interrupting_source(out, 5, stop))
    with pytest.raises(KeyboardInterrupt):
        prepare(settings, out, workers=1, quiet=True)
    assert not (out / "manifest.json").exists() and _done_shards(out) >= 5
    (out / "train_000009.bin.tmp").write_bytes(b"half a shard")  # debris of a shard being written
    monkeypatch.undo()
    prepare(settings, out, workers=2)
    assert "continuing from document" in capsys.readouterr().out  # complete shards were skipped, not redone
    assert _files_bytes(out) == _files_bytes(reference)
    assert (
        json.loads((out / "manifest.json").read_text())["splits"]
        == json.loads((reference / "manifest.json").read_text())["splits"]
    )
    assert not (out / STATE).exists()


def test_killed_worker_then_resume(tmp_path, monkeypatch, settings, reference):
    out = tmp_path / "ds"

    def kill_a_worker():
        victim = multiprocessing.active_children()[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()

    monkeypatch.setattr(encode, "TASK_DOCS", 64)  # small tasks: the look-ahead ends well before the stream
    monkeypatch.setitem(sources.SOURCES, "files", _interrupting_source(out, 3, kill_a_worker))
    with pytest.raises(Gpt2LabError, match="worker process died"):
        prepare(settings, out, workers=2, quiet=True)
    assert _done_shards(out) >= 3 and not (out / "manifest.json").exists()
    monkeypatch.undo()
    prepare(settings, out, workers=2, quiet=True)
    assert _files_bytes(out) == _files_bytes(reference)


def test_gutenberg_resume_skips_done_books(tmp_path, monkeypatch, shared_data):
    books = tmp_path / "books"
    for path in sorted((shared_data / "corpus_gutenberg" / "texts" / "austen").glob("*.txt"))[1:4]:
        (books / path.name).parent.mkdir(parents=True, exist_ok=True)
        (books / path.name).write_bytes(path.read_bytes())
    settings = Settings("gutenberg", shard_size=30_000, paths=[str(books)], val_books=1)
    reference = prepare(settings, tmp_path / "ref", workers=1, quiet=True)
    out = tmp_path / "ds"

    def stop():
        raise KeyboardInterrupt

    monkeypatch.setitem(sources.SOURCES, "gutenberg", _interrupting_source(out, 2, stop, "gutenberg"))
    with pytest.raises(KeyboardInterrupt):
        prepare(settings, out, workers=1, quiet=True)
    monkeypatch.undo()
    tokenized = []
    real_encode = encode.encode_documents
    monkeypatch.setattr(encode, "encode_documents", lambda texts: tokenized.extend(texts) or real_encode(texts))
    assert prepare(settings, out, workers=1, quiet=True)["splits"] == reference["splits"]
    assert _files_bytes(out) == _files_bytes(tmp_path / "ref")
    assert len(tokenized) == 2  # lady_susan, inside a complete train shard, was not tokenized again


def test_rerun_with_other_settings_is_refused(tmp_path, settings, reference):
    other = Settings(**{**settings.__dict__, "shard_size": 5000})
    with pytest.raises(Gpt2LabError, match="other settings"):
        prepare(other, reference, quiet=True)
    assert prepare(settings, reference, quiet=True)["splits"]  # same settings: already complete, nothing to do
