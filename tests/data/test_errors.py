"""Every bad input gets one clear message naming the file and the problem, and exit code 2 (via the CLI)."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2lab.cli.main import main
from tests.data.conftest import make_dataset, write_jsonl


def run_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    return make_dataset(
        tmp_path / "ds", {"train": [rng.integers(0, 50257, 5000)] * 2, "val": [rng.integers(0, 50257, 900)]}
    )


def test_truncated_shard(dataset, capsys):
    shard = dataset / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    err = run_error(capsys, ["data", "info", str(dataset)])
    assert str(shard) in err and "truncated" in err


def test_foreign_file(dataset, capsys):
    shard = dataset / "val_000000.bin"
    shard.write_bytes(b"PK\x03\x04 this is a zip file, not tokens" * 100)
    err = run_error(capsys, ["data", "info", str(dataset)])
    assert str(shard) in err and "magic number" in err
    (dataset / "train_000000.bin").write_bytes(b"tiny")
    assert "shorter than the 1024-byte header" in run_error(capsys, ["data", "info", str(dataset)])


def test_wrong_version(dataset, capsys):
    shard = dataset / "train_000000.bin"
    header = np.fromfile(shard, dtype=np.int32, count=256)
    header[1] = 7
    shard.write_bytes(header.tobytes() + shard.read_bytes()[1024:])
    err = run_error(capsys, ["data", "info", str(dataset)])
    assert str(shard) in err and "version 7" in err


def test_token_id_beyond_vocab(tmp_path, capsys):
    folder = make_dataset(tmp_path / "ds", {"train": [np.array([1, 2, 50257, 3])]})
    assert main(["data", "info", str(folder)]) == 0  # headers fine; ids are checked by --verify and the loader
    err = run_error(capsys, ["data", "info", str(folder), "--verify"])
    assert "train_000000.bin" in err and "token id 50257" in err


def test_missing_folder_and_manifest(tmp_path, capsys):
    assert f"{tmp_path / 'nope'} does not exist" in run_error(capsys, ["data", "info", str(tmp_path / "nope")])
    assert "has no manifest.json" in run_error(capsys, ["data", "info", str(tmp_path)])


def test_glob_matching_nothing(tmp_path, capsys):
    err = run_error(capsys, ["data", "prepare", "files", str(tmp_path / "*.jsonl"), "--out", str(tmp_path / "o")])
    assert "no files match" in err and str(tmp_path / "*.jsonl") in err


def test_empty_source(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "blank.txt").write_text("  \n\n")
    for name in ("empty.jsonl", "blank.txt"):
        err = run_error(capsys, ["data", "prepare", "files", str(tmp_path / name), "--out", str(tmp_path / "o")])
        assert "produced no documents" in err and name in err


def test_missing_text_field(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_jsonl(tmp_path / "docs.jsonl", ["a", "b"], field="content")
    err = run_error(capsys, ["data", "prepare", "files", str(path), "--out", str(tmp_path / "o")])
    assert f"{path}, line 1: no 'text' field" in err and "content" in err
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "docs.parquet")
    err = run_error(capsys, ["data", "prepare", "files", str(tmp_path / "docs.parquet"), "--out", str(tmp_path / "p")])
    assert "docs.parquet: no 'text' column (has: body)" in err


def test_only_val_is_refused_with_a_hint(tmp_path, capsys):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a short document"] * 10)
    argv = ["data", "prepare", "files", str(path), "--out", str(tmp_path / "o"), "--val-tokens", "1000"]
    err = run_error(capsys, argv)  # an explicit --val-tokens keeps its meaning: whole documents, that many
    assert "train split no tokens" in err and "--val-tokens" in err
