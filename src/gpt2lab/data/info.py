"""``gpt2lab data info``: what a prepared dataset folder holds, with its shards checked.

``gpt2lab data index`` writes the manifest for a folder of shards made by llm.c (its
``dev/data/*.py`` scripts name them ``NAME_train_000001.bin``, ``NAME_val.bin``...), so gpt2lab trains on them.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2lab.data.shards import (
    HEADER_BYTES,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    TOKEN_DTYPE,
    file_sha256,
    open_shard,
    read_header,
    read_manifest,
    shard_info,
    write_json,
)
from gpt2lab.errors import Gpt2LabError
from gpt2lab.tokenizer.bpe import EOT_ID

_SHOWN = {  # the settings that matter for each source
    "shakespeare": ["shard_size"],
    "fineweb-edu": ["shard_size", "val_tokens", "max_tokens"],
    "files": ["paths", "text_field", "blank_line_docs", "shard_size", "val_tokens", "val_fraction", "max_tokens"],
    "gutenberg": ["paths", "val_books", "shard_size", "max_tokens"],
}


def dataset_info(data_dir: str | Path, verify: bool = False) -> dict:
    """Check every listed shard (header, size; with ``verify`` also sha256 and token ids); return the manifest."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    vocab_size = int(manifest.get("tokenizer", {}).get("vocab_size", 50257))
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    for shard in tqdm(shards, desc="verify", unit=" shard", disable=not verify):
        path = data_dir / shard["file"]
        n = read_header(path)
        if n != shard["tokens"]:
            raise Gpt2LabError(f"{path} holds {n:,} tokens but {MANIFEST} lists {shard['tokens']:,}")
        if verify:
            if file_sha256(path) != shard["sha256"]:
                raise Gpt2LabError(f"{path}: sha256 differs from the one in {MANIFEST}; the file was changed")
            open_shard(path, vocab_size)  # raises on a token id >= vocab size
    return manifest


def _documents(manifest: dict) -> str:
    """The document count as the manifest knows it: from prepare, counted at indexing, or unknown."""
    if "documents" not in manifest:
        return "document count unknown (indexed before gpt2lab counted them: run `gpt2lab data index` again)"
    n = manifest["documents"]
    counted = " (counted as <|endoftext|> tokens)" if manifest.get("documents_counted_by") == "eot" else ""
    return f"{n:,} document{'' if n == 1 else 's'}{counted}"


def info_command(args: argparse.Namespace) -> int:
    manifest = dataset_info(args.dir, verify=args.verify)
    data_dir = Path(args.dir)
    settings = manifest.get("settings", {})
    tok = manifest.get("tokenizer", {})
    print(f"dataset   {data_dir}")
    keys = _SHOWN.get(manifest["source"], [k for k in settings if k != "source"])
    shown = " ".join(f"{k}={settings[k]}" for k in keys if settings.get(k) not in (None, [], False))
    print(f"source    {manifest['source']}  {shown}")
    sha = f", sha256 {tok['hash'][:12]}" if tok.get("hash") else ""
    print(f"tokenizer {tok.get('name')} (vocab {tok.get('vocab_size')}, <|endoftext|> = {tok.get('eot')}{sha})")
    print(f"created   {manifest.get('created')}, {_documents(manifest)}")
    for split in ("train", "val"):
        entry = manifest["splits"].get(split, {})
        sizes = [s["tokens"] for s in entry.get("shards", [])]
        if not sizes:
            why = "val loss is unavailable when training on it" if split == "val" else "nothing to train on"
            print(f"{split:<9} {'none':>15}  ({why})")
            continue
        each = f"{min(sizes):,} to {max(sizes):,} tokens each"
        print(f"{split:<9} {entry['tokens']:>15,} tokens in {len(sizes)} shard(s) ({each})")
    listed = {s["file"] for e in manifest["splits"].values() for s in e["shards"]}
    extra = sorted(p.name for p in data_dir.glob("*.bin") if p.name not in listed)
    if extra:
        print(f"note: not in {MANIFEST}, ignored: {', '.join(extra)}")
    print(
        "verified: headers, sizes, sha256, token ids"
        if args.verify
        else "checked: headers and sizes (--verify: checksums)"
    )
    return 0


_SPLIT_RE = re.compile(r"(?:^|_)(train|val)(?:_|$)")


def index_folder(data_dir: str | Path) -> dict:
    """Write manifest.json for a folder of llm.c shards: split from the file name, sizes from the headers."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise Gpt2LabError(f"folder {data_dir} does not exist")
    splits: dict[str, dict] = {}
    documents = 0
    for path in sorted(data_dir.glob("*.bin")):
        match = _SPLIT_RE.search(path.stem)
        if match is None:
            raise Gpt2LabError(
                f"{path}: cannot tell its split (expected 'train' or 'val' in the name, as llm.c writes)"
            )
        n, dtype = shard_info(path)
        if dtype != TOKEN_DTYPE:  # llm.c's uint32 ("llama-3") shards: their tokenizer is not GPT-2's
            raise Gpt2LabError(f"{path}: uint32 tokens of an unknown tokenizer; index reads GPT-2's uint16 shards")
        sha, eots = _scan_shard(path)
        documents += eots
        entry = splits.setdefault(match.group(1), {"tokens": 0, "shards": []})
        entry["tokens"] += n
        entry["shards"].append({"file": path.name, "tokens": n, "sha256": sha})
    if not splits:
        raise Gpt2LabError(f"folder {data_dir} holds no .bin shards")
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "source": "llm.c",
        "settings": {},
        "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eot": 50256},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "documents": documents,
        "documents_counted_by": "eot",  # llm.c's scripts start every document with <|endoftext|>
        "splits": splits,
    }
    write_json(data_dir / MANIFEST, manifest)
    return manifest


def _scan_shard(path: Path) -> tuple[str, int]:
    """A shard file's sha256 and its number of <|endoftext|> tokens, in one read of the file."""
    h, eots = hashlib.sha256(), 0
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
        h.update(header)
        while chunk := f.read(1 << 24):  # an even size: chunks hold whole uint16 tokens
            h.update(chunk)
            eots += int(np.count_nonzero(np.frombuffer(chunk, dtype=TOKEN_DTYPE) == EOT_ID))
    return h.hexdigest(), eots


def index_command(args: argparse.Namespace) -> int:
    manifest = index_folder(args.dir)
    counts = ", ".join(
        f"{s} {e['tokens']:,} tokens in {len(e['shards'])} shard(s)" for s, e in manifest["splits"].items()
    )
    print(f"wrote {Path(args.dir) / MANIFEST}: {counts}")
    return 0
