"""The shard file format and the dataset manifest.

A shard is llm.c's token file, byte for byte, so shards written by either tool are read by
the other: a header of 256 little-endian int32 (``[0]`` magic, ``[1]`` version, ``[2]`` token
count, the rest zero), then the tokens. Two kinds, as llm.c's ``dev/data/data_common.py`` (HEADERS_INFO):
magic 20240520 / version 1 with uint16 tokens (GPT-2's, and any vocabulary up to 65,535), and magic
20240801 / version 7 with uint32 tokens (llm.c's "llama-3" kind: a larger vocabulary). A dataset folder
holds the shards (``train_000000.bin``, ``val_000000.bin``, ...) and ``manifest.json`` listing them
per split with token counts and sha256 checksums, and which tokenizer made them (name + sha256; a
trained one's tokenizer.json is copied beside them); the manifest is written last, so a folder with
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
MAGIC_U32, VERSION_U32 = 20240801, 7  # llm.c's "llama-3" shards: uint32 tokens
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
TOKEN_DTYPE_U32 = np.dtype("<u4")
KINDS = {(MAGIC, VERSION): TOKEN_DTYPE, (MAGIC_U32, VERSION_U32): TOKEN_DTYPE_U32}  # (magic, version) -> dtype
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt2lab-shards"
MANIFEST_VERSION = 1


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 tokens up to a vocabulary of 65,535 (llm.c's GPT-2 shards), uint32 above."""
    return TOKEN_DTYPE if vocab_size <= 65535 else TOKEN_DTYPE_U32


def header_bytes(num_tokens: int, dtype: np.dtype = TOKEN_DTYPE) -> bytes:
    """The 1024-byte llm.c header for a shard of ``num_tokens`` tokens of ``dtype``."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    magic, version = next(kind for kind, d in KINDS.items() if d == dtype)
    header[0], header[1], header[2] = magic, version, num_tokens
    return header.tobytes()


def write_shard(path: str | Path, tokens: np.ndarray, dtype: np.dtype = TOKEN_DTYPE) -> str:
    """Write tokens as ``dtype`` to ``path`` through a temporary name and a rename; return the file's sha256."""
    path = Path(path)
    if tokens.size and int(tokens.max()) > np.iinfo(dtype).max:
        raise Gpt2LabError(f"{path}: token id {int(tokens.max())} does not fit the {dtype.name} shard format")
    data = header_bytes(tokens.size, dtype) + tokens.astype(dtype, copy=False).tobytes()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a shard under its final name is always complete
    return hashlib.sha256(data).hexdigest()


def read_header(path: str | Path) -> int:
    """Check a shard's header and size against llm.c's format; return its token count."""
    return shard_info(path)[0]


def shard_info(path: str | Path) -> tuple[int, np.dtype]:
    """Check a shard's header and size against llm.c's format; return its token count and token dtype."""
    path = Path(path)
    if not path.is_file():
        raise Gpt2LabError(f"shard {path} is missing")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise Gpt2LabError(f"{path} is not a token shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] not in (MAGIC, MAGIC_U32):
        raise Gpt2LabError(
            f"{path} is not a GPT-2 token shard: magic number {header[0]}, expected {MAGIC} "
            f"(llm.c / gpt2lab uint16 shards) or {MAGIC_U32} (uint32); was it written by another tool?"
        )
    dtype = KINDS.get((int(header[0]), int(header[1])))
    if dtype is None:
        want = VERSION if header[0] == MAGIC else VERSION_U32
        raise Gpt2LabError(
            f"{path} has shard format version {header[1]}, this gpt2lab reads version {want} with magic {header[0]} "
            f"({'uint16' if header[0] == MAGIC else 'uint32'} tokens); re-run `gpt2lab data prepare`"
        )
    num_tokens = int(header[2])
    expected = HEADER_BYTES + num_tokens * dtype.itemsize
    if size != expected:
        raise Gpt2LabError(
            f"{path} is truncated or corrupt: its header says {num_tokens:,} tokens ({expected:,} bytes) "
            f"but the file has {size:,} bytes"
        )
    return num_tokens, dtype


def open_shard(path: str | Path, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a shard's tokens after checking its header (and, given ``vocab_size``, its ids)."""
    num_tokens, dtype = shard_info(path)
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
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
    path.parent.mkdir(parents=True, exist_ok=True)
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


def manifest_tokenizer(manifest: dict) -> dict:
    """The tokenizer a dataset was made with: name, sha256, vocab_size, eot (a manifest without one: GPT-2's)."""
    from gpt2lab.tokenizer.bpe import EOT_ID, GPT2_HASH, VOCAB_SIZE

    record = {"name": "gpt2", "hash": GPT2_HASH, "vocab_size": VOCAB_SIZE, "eot": EOT_ID}
    return record | manifest.get("tokenizer", {})


def dataset_tokenizer(data_dir: str | Path, manifest: dict | None = None):
    """The tokenizer that made a dataset's shards: GPT-2's, or the trained one whose tokenizer.json lies beside them."""
    from gpt2lab.tokenizer.bpe import get_tokenizer, load_tokenizer

    record = manifest_tokenizer(manifest or read_manifest(data_dir))
    if record["name"] == "gpt2":
        return get_tokenizer()
    tok = load_tokenizer(data_dir)
    if tok.hash != record["hash"]:
        raise Gpt2LabError(f"{data_dir}/tokenizer.json is not the tokenizer its manifest names ({record['name']})")
    return tok
