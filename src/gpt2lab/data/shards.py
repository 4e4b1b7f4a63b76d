"""The shard file format and the dataset manifest.

A shard is llm.c's GPT-2 token file, byte for byte, so shards written by either tool are read by
the other: a header of 256 little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1,
``[2]`` token count, the rest zero), then the tokens as little-endian uint16. A dataset folder
holds the shards (``train_000000.bin``, ``val_000000.bin``, ...) and ``manifest.json`` listing them
per split with token counts and sha256 checksums; the manifest is written last, so a folder with
a manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from gpt2lab.errors import Gpt2LabError

MAGIC = 20240520  # llm.c's magic number for GPT-2 token shards
VERSION = 1  # llm.c's version for uint16 GPT-2 tokens
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt2lab-shards"
MANIFEST_VERSION = 1


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def header_bytes(num_tokens: int) -> bytes:
    """The 1024-byte llm.c header for a shard of ``num_tokens`` tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, num_tokens
    return header.tobytes()


def write_shard(path: str | Path, tokens: np.ndarray) -> str:
    """Write tokens to ``path`` through a temporary name and a rename; return the file's sha256."""
    path = Path(path)
    if tokens.size and int(tokens.max()) >= 2**16:
        raise Gpt2LabError(f"{path}: token id {int(tokens.max())} does not fit the uint16 shard format")
    data = header_bytes(tokens.size) + tokens.astype(TOKEN_DTYPE, copy=False).tobytes()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a shard under its final name is always complete
    return hashlib.sha256(data).hexdigest()


def read_header(path: str | Path) -> int:
    """Check a shard's header and size against llm.c's format; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise Gpt2LabError(f"shard {path} is missing")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise Gpt2LabError(f"{path} is not a token shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise Gpt2LabError(
            f"{path} is not a GPT-2 token shard: magic number {header[0]}, expected {MAGIC} "
            "(llm.c / gpt2lab uint16 shards); was it written by another tool?"
        )
    if header[1] != VERSION:
        raise Gpt2LabError(
            f"{path} has shard format version {header[1]}, this gpt2lab reads version {VERSION} "
            "(uint16 GPT-2 tokens); re-run `gpt2lab data prepare`"
        )
    num_tokens = int(header[2])
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if size != expected:
        raise Gpt2LabError(
            f"{path} is truncated or corrupt: its header says {num_tokens:,} tokens ({expected:,} bytes) "
            f"but the file has {size:,} bytes"
        )
    return num_tokens


def open_shard(path: str | Path, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a shard's tokens after checking its header (and, given ``vocab_size``, its ids)."""
    num_tokens = read_header(path)
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if vocab_size is not None and num_tokens:
        top = int(tokens.max())  # one pass over the file, once per shard: a cheap guard against a silent wrong batch
        if top >= vocab_size:
            raise Gpt2LabError(f"{path} holds token id {top}, not below the vocabulary size {vocab_size}")
    return tokens


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared dataset folder, checked for the fields the loader needs."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise Gpt2LabError(f"dataset folder {data_dir} does not exist (create it with `gpt2lab data prepare`)")
    path = data_dir / MANIFEST
    if not path.is_file():
        hint = (
            " (a prepare run is unfinished: run the same command again)"
            if (data_dir / "prepare_state.json").exists()
            else ""
        )
        raise Gpt2LabError(f"dataset folder {data_dir} has no {MANIFEST}{hint}; create it with `gpt2lab data prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gpt2LabError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise Gpt2LabError(f'{path} is not a gpt2lab dataset manifest (no "format": "{MANIFEST_FORMAT}")')
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise Gpt2LabError(f"{path} has manifest version {manifest.get('format_version')}, expected {MANIFEST_VERSION}")
    return manifest


def split_shards(data_dir: str | Path, manifest: dict, split: str) -> list[dict]:
    """The shard records of one split; a clear error when the split is absent or empty."""
    splits = manifest.get("splits", {})
    shards = splits.get(split, {}).get("shards", [])
    if not shards:
        have = ", ".join(sorted(splits)) or "none"
        raise Gpt2LabError(f"dataset folder {data_dir} has no '{split}' split (splits: {have})")
    return shards
