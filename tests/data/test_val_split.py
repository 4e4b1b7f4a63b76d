"""The default val split of a plain stream: min(1M tokens, ~10% of the corpus), whole documents or a cut; none at all.

And what training sees of it: ``open_val_loader`` gives a loader for a small val split and a reason when there is none.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2lab.cli.main import main
from gpt2lab.data import encode, sources
from gpt2lab.data.prepare import STATE, Settings, prepare
from tests.data.conftest import make_dataset

EOT = 50256


def _split(folder, split: str) -> list[int]:
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = manifest["splits"].get(split, {}).get("shards", [])
    return [t for s in shards for t in np.fromfile(folder / s["file"], dtype="<u2", offset=1024).tolist()]


def _docs_tokens(docs: list[str], enc) -> list[list[int]]:
    return [[EOT] + enc.encode_ordinary(d) for d in docs]


@pytest.fixture(scope="module")
def forty_docs(speeches) -> list[str]:
    """40 documents of about 250 tokens: the issue's small corpus (40 files, ~10k tokens)."""
    return ["\n\n".join(speeches[8 * i : 8 * i + 8]) for i in range(40)]


def test_small_corpus_prepares_without_flags_whole_documents(tmp_path, monkeypatch, capsys, forty_docs, ref_enc):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(forty_docs):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(doc)
    assert main(["data", "prepare", "files", "docs/*.txt", "--out", "data/docs"]) == 0  # the command
    docs = _docs_tokens(forty_docs, ref_enc)
    total = sum(map(len, docs))
    val, train = _split(tmp_path / "data" / "docs", "val"), _split(tmp_path / "data" / "docs", "train")
    assert val + train == [t for d in docs for t in d]  # nothing lost, in order
    assert 0.1 * total <= len(val) <= 0.2 * total  # about 10%
    k = next(i for i in range(len(docs) + 1) if sum(map(len, docs[:i])) == len(val))  # whole documents
    assert train[0] == EOT and k >= 2
    assert "warning" not in capsys.readouterr().err


def test_one_big_text_is_cut_inside_the_document(tmp_path, shakespeare_text, ref_enc):
    text = shakespeare_text[:60_000]
    (tmp_path / "input.txt").write_text(text)
    assert main(["data", "prepare", "files", str(tmp_path / "input.txt"), "--out", str(tmp_path / "ds")]) == 0
    tokens = [EOT] + ref_enc.encode_ordinary(text)
    val, train = _split(tmp_path / "ds", "val"), _split(tmp_path / "ds", "train")
    assert len(val) == int(len(tokens) * 0.1)  # nanoGPT's 90/10, in tokens, val first
    assert val + train == tokens


def test_corpus_too_small_for_val_is_train_only_with_a_warning(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("Hello there.")
    assert main(["data", "prepare", "files", str(tmp_path / "tiny.txt"), "--out", str(tmp_path / "ds")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "no val split" in err and "val loss will be unavailable" in err
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train"] and manifest["splits"]["train"]["tokens"] == 4
    assert main(["data", "info", str(tmp_path / "ds"), "--verify"]) == 0
    assert "val loss is unavailable" in capsys.readouterr().out


def test_explicit_val_tokens_zero_means_no_val_split(tmp_path, capsys, forty_docs):
    (tmp_path / "a.txt").write_text(forty_docs[0])
    argv = ["data", "prepare", "files", str(tmp_path / "a.txt"), "--out", str(tmp_path / "ds"), "--val-tokens", "0"]
    assert main(argv) == 0
    assert "--val-tokens 0" in capsys.readouterr().err
    assert list(json.loads((tmp_path / "ds" / "manifest.json").read_text())["splits"]) == ["train"]


def test_files_default_is_one_million_tokens_or_ten_percent():
    from gpt2lab.data.prepare import val_settings  # here: the other tests of this file run on older versions too

    assert val_settings("files", None, 10_000_000) == (1_000_000, 0.1)
    assert val_settings("files", 5000, 10_000_000) == (5000, None)  # explicit: exactly that, whole documents
    assert val_settings("fineweb-edu", None, 100_000_000) == (100_000_000, None)  # its documented default
    assert val_settings("shakespeare", None, 10_000_000) == (None, None)  # the source splits itself


def _interrupting(out, after: int):
    """The real files source, raising KeyboardInterrupt once ``after`` shards are complete."""
    real = sources.SOURCES["files"]

    def documents(opts):
        for doc in real.documents(opts):
            state = json.loads((out / STATE).read_text()) if (out / STATE).exists() else {"splits": {}}
            if sum(len(s["shards"]) for s in state["splits"].values()) >= after:
                raise KeyboardInterrupt
            yield doc

    return sources.Source("files", documents, real.help, real.shard_size)


@pytest.mark.parametrize("layout", ["many documents", "few long documents"])
def test_capped_val_split_streams_and_resumes_byte_identical(tmp_path, monkeypatch, speeches, ref_enc, layout):
    """Past val_tokens / val_fraction tokens the val split is val_tokens; an interrupted run resumes exactly."""
    if layout == "many documents":
        docs = speeches[:1500]
    else:  # four documents of ~5,000 tokens: the cut falls inside the first
        docs = ["\n\n".join(speeches[i : i + 400]) for i in range(0, 1600, 400)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    settings = Settings(
        "files", shard_size=1000, val_tokens=600, val_fraction=0.1, paths=[str(tmp_path / "c.jsonl")]
    )  # held back until 6,000 tokens have come: then val is 600 tokens, of a corpus several times larger
    reference = prepare(settings, tmp_path / "ref", workers=1, quiet=True)
    tokens = [t for d in _docs_tokens(docs, ref_enc) for t in d]
    val, train = _split(tmp_path / "ref", "val"), _split(tmp_path / "ref", "train")
    assert val + train == tokens and len(tokens) > 20 * 600
    if layout == "many documents":
        assert 600 <= len(val) <= 1200 and train[0] == EOT
    else:
        assert len(val) == 600 and train[0] != EOT  # a cut inside a document
    out = tmp_path / "ds"
    monkeypatch.setattr(encode, "TASK_DOCS", 1)  # a task per document: the stop lands mid-stream
    monkeypatch.setitem(sources.SOURCES, "files", _interrupting(out, 4))
    with pytest.raises(KeyboardInterrupt):
        prepare(settings, out, workers=1, quiet=True)
    assert (out / STATE).exists() and not (out / "manifest.json").exists()
    monkeypatch.undo()
    assert prepare(settings, out, workers=2, quiet=True)["splits"] == reference["splits"]
    assert {p.name: p.read_bytes() for p in out.glob("*.bin")} == {
        p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.bin")
    }


# ----------------------------------------------------------------------------- what training gets


def test_open_val_loader_without_or_with_a_small_val_split(tmp_path):
    from gpt2lab.data.loader import open_val_loader

    rng = np.random.default_rng(0)
    train = [rng.integers(0, 50257, 5000)]
    no_val = make_dataset(tmp_path / "a", {"train": train})
    loader, why = open_val_loader(no_val, 8, 64)
    assert loader is None and "has no val split" in why and str(no_val) in why
    small = make_dataset(tmp_path / "b", {"train": train, "val": [rng.integers(0, 50257, 3 * 64 + 1)]})
    loader, note = open_val_loader(small, 8, 64)  # 3 sequences, fewer than a batch of 8
    x, y = loader.next_batch()
    assert x.shape == y.shape == (3, 64) and "3 sequences" in note
    assert open_val_loader(small, 8, 64, world_size=2, rank=1)[0].next_batch()[0].shape == (1, 64)
    loader, why = open_val_loader(small, 8, 256)
    assert loader is None and "fewer than one sequence of 256" in why
    full = make_dataset(tmp_path / "c", {"train": train, "val": [rng.integers(0, 50257, 20 * 64 + 1)]})
    loader, note = open_val_loader(full, 8, 64)
    assert loader.next_batch()[0].shape == (8, 64) and note == ""
