"""prepare: token counts and ids against tiktoken, the round trip through the loader, every source, llm.c files."""

from __future__ import annotations

import json

import numpy as np

from gpt2lab.cli.main import main
from gpt2lab.data.loader import ShardLoader
from gpt2lab.data.prepare import Settings, prepare
from gpt2lab.data.shards import HEADER_BYTES, read_header
from gpt2lab.data.sources import held_out_books, strip_gutenberg
from tests.data.conftest import write_jsonl

EOT = 50256


def llmc_read(path) -> np.ndarray:
    """llm.c's own reader (train_gpt2.py ``_load_data_shard``), line for line."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype=np.int32)
        assert header[0] == 20240520, "magic number mismatch in the data .bin file"
        assert header[1] == 1, "unsupported version"
        ntok = header[2]
        tokens = np.frombuffer(f.read(), dtype=np.uint16)
    assert len(tokens) == ntok, "number of tokens read does not match header?"
    return tokens


def split_tokens(folder, split: str) -> np.ndarray:
    manifest = json.loads((folder / "manifest.json").read_text())
    return np.concatenate([llmc_read(folder / s["file"]) for s in manifest["splits"][split]["shards"]])


def test_shakespeare_matches_nanogpt_and_llmc_reads_it(tmp_path, monkeypatch, shared_data, shakespeare_text, ref_enc):
    monkeypatch.chdir(tmp_path)  # the README's command, relative --out
    assert main(["data", "prepare", "shakespeare", "--out", "data/shakespeare", "--mirror", str(shared_data)]) == 0
    out = tmp_path / "data" / "shakespeare"
    train, val = split_tokens(out, "train"), split_tokens(out, "val")
    assert (len(train), len(val)) == (301_966 + 1, 36_059 + 1)  # nanoGPT's counts, plus one <|endoftext|> each
    n = int(len(shakespeare_text) * 0.9)
    assert train.tolist() == [EOT] + ref_enc.encode_ordinary(shakespeare_text[:n])
    assert val.tolist() == [EOT] + ref_enc.encode_ordinary(shakespeare_text[n:])
    assert main(["data", "info", str(out), "--verify"]) == 0


def test_round_trip_text_shards_loader_text(tmp_path, speeches, ref_enc):
    docs = speeches[:400]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    settings = Settings("files", shard_size=1000, val_tokens=500, paths=[str(tmp_path / "docs.jsonl")])
    manifest = prepare(settings, tmp_path / "ds", workers=2, quiet=True)
    assert all(s["tokens"] == 1000 for s in manifest["splits"]["train"]["shards"][:-1])
    stream = np.concatenate([split_tokens(tmp_path / "ds", s) for s in ("val", "train")])
    expected = [t for d in docs for t in [EOT] + ref_enc.encode_ordinary(d)]
    assert stream.tolist() == expected  # order kept across workers, val = first whole documents
    val_docs = manifest["splits"]["val"]["tokens"]
    assert 500 <= val_docs < 500 + max(len(ref_enc.encode_ordinary(d)) + 1 for d in docs)
    # back to text through the loader, in order
    loader = ShardLoader(tmp_path / "ds", "val", 1, 50, shuffle=False)
    text = ref_enc.decode(
        np.concatenate([loader.next_batch()[0][0].numpy() for _ in range(loader.batches_per_epoch)]).tolist()
    )
    joined = "".join("<|endoftext|>" + d for d in docs)
    assert joined.startswith(text) and len(text) > 1000


def test_fineweb_from_local_parquet(tmp_path, speeches, ref_enc):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = speeches[:300]
    folder = tmp_path / "mirror" / "fineweb-edu"
    folder.mkdir(parents=True)  # laid out as the hub's files: text plus metadata columns
    table = pa.table({"text": docs, "id": [f"<urn:{i}>" for i in range(len(docs))], "score": [3.1] * len(docs)})
    pq.write_table(table.slice(0, 150), folder / "000_00000.parquet")
    pq.write_table(table.slice(150), folder / "000_00001.parquet")
    argv = ["data", "prepare", "fineweb-edu", "--out", str(tmp_path / "edu"), "--mirror", str(tmp_path / "mirror")]
    assert main([*argv, "--shard-size", "2000", "--max-tokens", "9000", "--workers", "2"]) == 0
    manifest = json.loads((tmp_path / "edu" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["splits"]["val"]["shards"]] == ["val_000000.bin"]  # the first shard is val
    assert manifest["splits"]["val"]["tokens"] + manifest["splits"]["train"]["tokens"] == 9000
    expected = [t for d in docs for t in [EOT] + ref_enc.encode_ordinary(d)][:9000]
    assert np.concatenate([split_tokens(tmp_path / "edu", s) for s in ("val", "train")]).tolist() == expected


def test_files_txt_blank_line_blocks(tmp_path, ref_enc):
    (tmp_path / "a.txt").write_text("First doc.\r\nline two\r\n\r\n  \r\nSecond doc.\n")
    (tmp_path / "b.txt").write_text("Third, a whole file.\n\nStill third.")
    out = tmp_path / "ds"
    argv = ["data", "prepare", "files", str(tmp_path / "*.txt"), "--out", str(out), "--val-tokens", "1"]
    assert main([*argv, "--blank-line-docs", "--workers", "1"]) == 0
    tokens = np.concatenate([split_tokens(out, s) for s in ("val", "train")]).tolist()
    docs = ["First doc.\nline two", "Second doc.", "Third, a whole file.", "Still third."]
    assert tokens == [t for d in docs for t in [EOT] + ref_enc.encode_ordinary(d)]


def test_gutenberg_strips_licence_and_holds_out_books(tmp_path, shared_data, ref_enc):
    raw_path = shared_data / "corpus_gutenberg" / "texts" / "austen" / "lady_susan.txt"
    raw = raw_path.read_bytes().decode("utf-8")
    assert "\r\n" in raw
    lines = raw.split("\r\n")  # independent few lines: keep what lies strictly between the marker lines
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    expected = "\n".join(lines[start + 1 : end]).strip()
    from gpt2lab.data.sources import read_text

    stripped = strip_gutenberg(read_text(raw_path))
    assert stripped == expected and stripped.startswith("Produced by") and "\r" not in stripped
    assert "PROJECT GUTENBERG LICENSE" not in stripped.upper()
    # a small folder of real books: the held-out one becomes val
    books = tmp_path / "books"
    for name in ("lady_susan.txt", "love_and_freindship_sic.txt"):
        (books / "austen").mkdir(parents=True, exist_ok=True)
        (books / "austen" / name).write_bytes((raw_path.parent / name).read_bytes())
    assert main(["data", "prepare", "gutenberg", str(books), "--out", str(tmp_path / "g"), "--val-books", "1"]) == 0
    (val_book,) = held_out_books(["austen/lady_susan.txt", "austen/love_and_freindship_sic.txt"], 1)
    val_text = strip_gutenberg(read_text(books / val_book))
    assert split_tokens(tmp_path / "g", "val").tolist() == [EOT] + ref_enc.encode_ordinary(val_text)


def test_llmc_written_shards_are_read(tmp_path, capsys):
    """Shards written by hand exactly as llm.c's write_datafile does, indexed, then loaded."""
    folder = tmp_path / "edu_fineweb10B"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name in ("edufineweb_val_000000.bin", "edufineweb_train_000001.bin", "edufineweb_train_000002.bin"):
        toks = rng.integers(0, 50257, 3000)
        header = np.zeros(256, dtype=np.int32)
        header[0], header[1], header[2] = 20240520, 1, len(toks)
        with open(folder / name, "wb") as f:
            f.write(header.tobytes())
            f.write(toks.astype(np.uint16).tobytes())
        written[name] = toks
    assert read_header(folder / "edufineweb_val_000000.bin") == 3000
    assert (folder / "edufineweb_val_000000.bin").stat().st_size == HEADER_BYTES + 2 * 3000
    assert main(["data", "index", str(folder)]) == 0
    loader = ShardLoader(folder, "train", 2, 1000, shuffle=False)
    x, y = loader.next_batch()
    np.testing.assert_array_equal(x.numpy().ravel(), written["edufineweb_train_000001.bin"][:2000])
    assert main(["data", "info", str(folder), "--verify"]) == 0
    assert "val" in capsys.readouterr().out


def test_index_counts_documents_by_their_delimiter(tmp_path, capsys):
    """llm.c shards carry no document count: indexing counts the <|endoftext|> that starts each document."""
    folder = tmp_path / "llmc"
    folder.mkdir()
    rng = np.random.default_rng(1)
    starts = {"tiny_val.bin": 3, "tiny_train_000001.bin": 5}
    for name, docs in starts.items():
        toks = rng.integers(0, 50256, 4000)  # ids below 50256: no stray delimiters
        toks[np.linspace(0, 3999, docs).astype(int)] = EOT
        header = np.zeros(256, dtype=np.int32)
        header[:3] = 20240520, 1, len(toks)
        (folder / name).write_bytes(header.tobytes() + toks.astype(np.uint16).tobytes())
    assert main(["data", "index", str(folder)]) == 0
    assert json.loads((folder / "manifest.json").read_text())["documents"] == 8
    capsys.readouterr()
    assert main(["data", "info", str(folder)]) == 0
    assert "8 documents (counted as <|endoftext|> tokens)" in capsys.readouterr().out
