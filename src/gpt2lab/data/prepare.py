"""``gpt2lab data prepare``: documents -> GPT-2 tokens (in parallel worker processes) -> shards + manifest.

The pipeline, as llm.c's ``dev/data/fineweb.py`` but resumable and with bounded memory:
- the source's documents are grouped into tasks of a few hundred KB and tokenized by a pool of
  worker processes; results come back in document order, and at most ``2 * workers + 2`` tasks are
  in flight, so a corpus of any size streams through in bounded memory;
- every document becomes ``[<|endoftext|>] + encode_ordinary(text)``;
- each split fills shards of exactly ``shard_size`` tokens (a document may continue in the next
  shard); the last shard of a split is partial; with a plain stream (no split from the source) the
  first ``val_tokens`` tokens, in whole documents, form the single shard ``val_000000.bin``;
- so the shards are a deterministic function of the document stream and the settings. Each shard
  is written under a temporary name and renamed, then ``prepare_state.json`` records it with the
  stream position where the next shard of its split begins. A rerun of the same command skips the
  documents already in complete shards (without tokenizing them) and produces byte-identical shards;
- ``manifest.json`` is written last: a folder with a manifest is complete.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2lab.data.shards import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    read_header,
    shard_name,
    write_json,
    write_shard,
)
from gpt2lab.data.sources import SourceOptions, get_source, mirror_dir
from gpt2lab.errors import Gpt2LabError
from gpt2lab.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer

STATE = "prepare_state.json"
TASK_DOCS, TASK_CHARS = 512, 1 << 18  # a task: up to 512 documents or 256K characters


@dataclass
class Settings:
    """Everything that determines the shards' contents (recorded in the manifest, checked on resume)."""

    source: str
    shard_size: int
    val_tokens: int | None = None  # plain streams: tokens (whole documents) taken as val first
    max_tokens: int | None = None  # stop after this many tokens in all
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    blank_line_docs: bool = False
    val_books: int = 4


# ----------------------------------------------------------------------------- tokenization workers


@functools.cache
def load_tokenizer():
    """The GPT-2 tokenizer, loaded once per process (parsing the BPE files takes ~0.3 s)."""
    return get_tokenizer()


_ENC = None  # the worker's tiktoken Encoding


def _init_worker(tokenizer_folder: str | None) -> None:
    global _ENC
    if _ENC is None:  # a forked worker inherits the parent's; a spawned one loads its own
        _ENC = get_tokenizer(tokenizer_folder).enc


def _start_worker(tokenizer_folder: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it stops the pool)
    _init_worker(tokenizer_folder)


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of several documents, each preceded by <|endoftext|>, concatenated; and each one's length."""
    tokens: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        before = len(tokens)
        tokens.append(EOT_ID)
        tokens.extend(_ENC.encode_ordinary(text))
        lengths[i] = len(tokens) - before
    return np.array(tokens, dtype=np.uint16), lengths


def _tasks(docs: Iterator[tuple[int, str | None, str]]) -> Iterator[tuple[list[int], list[str | None], list[str]]]:
    """Group (index, split, text) into tasks of at most TASK_DOCS documents / TASK_CHARS characters."""
    idx, splits, texts, chars = [], [], [], 0
    for i, split, text in docs:
        idx.append(i)
        splits.append(split)
        texts.append(text)
        chars += len(text)
        if len(texts) >= TASK_DOCS or chars >= TASK_CHARS:
            yield idx, splits, texts
            idx, splits, texts, chars = [], [], [], 0
    if texts:
        yield idx, splits, texts


def tokenize_stream(docs: Iterator[tuple[int, str | None, str]], workers: int, tokenizer_folder: str | None):
    """Yield (indices, splits, tokens, lengths) per task, in document order, with bounded look-ahead."""
    if workers <= 1:  # in-process: no pickling, the honest single-core baseline
        _init_worker(tokenizer_folder)
        for idx, splits, texts in _tasks(docs):
            yield idx, splits, *encode_documents(texts)
        return
    pool = ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(tokenizer_folder,))
    pending: deque = deque()
    try:
        for idx, splits, texts in _tasks(docs):
            pending.append((idx, splits, pool.submit(encode_documents, texts)))
            if len(pending) >= 2 * workers + 2:
                idx0, splits0, fut = pending.popleft()
                yield idx0, splits0, *fut.result()
        while pending:
            idx0, splits0, fut = pending.popleft()
            yield idx0, splits0, *fut.result()
    except BrokenProcessPool as e:
        raise Gpt2LabError(
            "a tokenizer worker process died (killed, or out of memory?); the complete shards are kept: "
            "run the same command again to resume"
        ) from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- shard writers


class SplitWriter:
    """Fills the shards of one split; records each finished shard and where the next one begins."""

    def __init__(self, out: Path, split: str, shard_size: int | None, saved: dict | None):
        self.out, self.split, self.shard_size = out, split, shard_size  # None: one shard, flushed explicitly
        saved = saved or {"shards": [], "next": [0, 0, 0]}
        self.shards: list[dict] = saved["shards"]
        self.resume_doc, self.resume_offset, self.resume_total = saved["next"]  # (doc, token offset, tokens before doc)
        self.parts: list[np.ndarray] = []
        self.fill = 0
        self.closed = False

    def add(self, tokens: np.ndarray, doc: int, total_before: int, on_shard) -> None:
        offset = 0
        if doc < self.resume_doc:
            return  # already inside a complete shard
        if doc == self.resume_doc:
            offset = self.resume_offset
        while offset < len(tokens):
            room = len(tokens) - offset if self.shard_size is None else self.shard_size - self.fill
            take = min(room, len(tokens) - offset)
            self.parts.append(tokens[offset : offset + take])
            self.fill += take
            offset += take
            if self.fill == self.shard_size:
                self.flush((doc, offset, total_before), on_shard)

    def flush(self, next_pos: tuple[int, int, int], on_shard) -> None:
        """Write the buffered tokens as the split's next shard (nothing when empty)."""
        if self.fill:
            name = shard_name(self.split, len(self.shards))
            sha = write_shard(self.out / name, np.concatenate(self.parts))
            self.shards.append({"file": name, "tokens": self.fill, "sha256": sha})
            self.parts, self.fill = [], 0
            self.resume_doc, self.resume_offset, self.resume_total = next_pos
            on_shard()

    def state(self) -> dict:
        return {"shards": self.shards, "next": [self.resume_doc, self.resume_offset, self.resume_total]}


# ----------------------------------------------------------------------------- the run


def _load_state(out: Path, settings: Settings) -> dict:
    """The state of an unfinished run in ``out`` with the same settings, or a fresh one."""
    fresh = {"settings": asdict(settings), "splits": {}, "val_end": None}
    if not (out / STATE).is_file():
        return fresh
    state = json.loads((out / STATE).read_text())
    if state.get("settings") != asdict(settings):
        raise Gpt2LabError(
            f"{out} holds an unfinished prepare run with other settings ({state.get('settings')}); "
            "run it with those settings to finish, or delete the folder / choose another --out"
        )
    for saved in state["splits"].values():
        for shard in saved["shards"]:
            if read_header(out / shard["file"]) != shard["tokens"]:
                raise Gpt2LabError(f"{out / shard['file']} does not match {out / STATE}; delete {out} and start over")
    return state


def _documents(
    settings: Settings, opts: SourceOptions, start: int, writers: dict
) -> Iterator[tuple[int, str | None, str]]:
    """(index, split, text) for the documents still needed from ``start`` on; the others are skipped untokenized.

    A document the source assigns to a split whose complete shards already hold it is skipped too,
    unless --max-tokens needs every token counted (Gutenberg's val books lie all along the stream).
    """
    for i, (split, text) in enumerate(get_source(settings.source).documents(opts)):
        if i < start or (split is not None and settings.max_tokens is None and i < writers[split].resume_doc):
            continue
        yield i, split, text


def prepare(
    settings: Settings,
    out: str | Path,
    *,
    mirror: str | Path | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> dict:
    """Tokenize a source into shards under ``out``; resume an unfinished run; return the manifest."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("settings") != asdict(settings):
            raise Gpt2LabError(f"{out} already holds a dataset prepared with other settings; choose another --out")
        if not quiet:
            print(f"{out} is already complete ({MANIFEST} exists); nothing to do")
        return manifest
    if settings.shard_size < 1:
        raise Gpt2LabError(f"--shard-size must be positive, got {settings.shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, settings)
    opts = SourceOptions(
        mirror_dir(mirror), settings.paths, settings.text_field, settings.blank_line_docs, settings.val_books
    )
    global _ENC
    tok = load_tokenizer()
    _ENC = tok.enc  # loaded once here: forked workers and the in-process path reuse it
    tok_folder = str(tok.files[0].parent) if tok.files and tok.files[0].name == "encoder.json" else None
    workers = workers or os.cpu_count() or 1

    writers = {s: SplitWriter(out, s, settings.shard_size, state["splits"].get(s)) for s in ("train", "val")}
    val_end = state["val_end"]  # plain stream: the first document that goes to train
    if settings.val_tokens is not None and val_end is None:
        writers["val"].shard_size = None  # the val split is one shard of whole documents
    start, total = min((w.resume_doc, w.resume_total) for w in writers.values())
    if start and not quiet:
        done = sum(len(w.shards) for w in writers.values())
        print(f"resuming {out}: {done} shard(s) complete, continuing from document {start:,}")

    def save_state() -> None:
        write_json(
            out / STATE,
            {"settings": asdict(settings), "splits": {s: w.state() for s, w in writers.items()}, "val_end": val_end},
        )

    num_docs, t0, total0 = start, time.time(), total
    bar = tqdm(desc=f"prepare {settings.source}", unit=" docs", initial=start, dynamic_ncols=True, disable=quiet)
    stream = tokenize_stream(_documents(settings, opts, start, writers), workers, tok_folder)
    try:
        for idx, splits, tokens, lengths in stream:
            pos = 0
            for doc, split, n in zip(idx, splits, lengths.tolist()):
                doc_tokens, pos = tokens[pos : pos + n], pos + n
                if settings.max_tokens is not None:
                    doc_tokens = doc_tokens[: max(settings.max_tokens - total, 0)]
                if split is None:  # plain stream: whole documents to val until val_tokens is reached
                    if val_end is None and total >= settings.val_tokens:
                        val_end = doc
                        writers["val"].flush((doc, 0, total), save_state)
                    split = "val" if val_end is None or doc < val_end else "train"
                writers[split].add(doc_tokens, doc, total, save_state)
                total += len(doc_tokens)
                num_docs = doc + 1
                if settings.max_tokens is not None and total >= settings.max_tokens:
                    break
            bar.update(len(idx))
            rate = (total - total0) / max(time.time() - t0, 1e-9)
            bar.set_postfix_str(f"{total:,} tokens, {rate:,.0f} tok/s", refresh=False)
            if settings.max_tokens is not None and total >= settings.max_tokens:
                break
    finally:
        stream.close()  # stops the worker pool, also on an error
        bar.close()
    end = (num_docs, 0, total)
    for w in writers.values():
        w.flush(end, save_state)
    return _finish(out, settings, writers, num_docs, quiet)


def _finish(out: Path, settings: Settings, writers: dict[str, SplitWriter], num_docs: int, quiet: bool) -> dict:
    """Check that both splits have tokens, then write the manifest (last) and drop the run state."""
    counts = {s: sum(sh["tokens"] for sh in w.shards) for s, w in writers.items()}
    if num_docs == 0 or sum(counts.values()) == 0:
        raise Gpt2LabError(f"source '{settings.source}' produced no documents {settings.paths or ''}".rstrip())
    for split, n in counts.items():
        if n == 0:
            hint = (
                f"; delete {out} and run again with a lower --val-tokens (now {settings.val_tokens:,})"
                if settings.val_tokens and split == "train"
                else ""
            )
            total = sum(counts.values())
            raise Gpt2LabError(f"source '{settings.source}' gave the {split} split no tokens ({total:,} in all){hint}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "source": settings.source,
        "settings": asdict(settings),
        "tokenizer": {"name": "gpt2", "vocab_size": VOCAB_SIZE, "eot": EOT_ID},
        "shard_format": {"header_int32": 256, "magic": 20240520, "version": 1, "dtype": "uint16"},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "documents": num_docs,
        "splits": {s: {"tokens": counts[s], "shards": w.shards} for s, w in writers.items()},
    }
    write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    if not quiet:
        done = ", ".join(f"{s} {counts[s]:,} tokens in {len(w.shards)} shard(s)" for s, w in writers.items())
        print(f"wrote {out}: {done}")
    return manifest


def prepare_command(args: argparse.Namespace) -> int:
    """CLI entry: build the settings from the parsed arguments and run ``prepare``."""
    source = get_source(args.source)
    stream = args.source in ("fineweb-edu", "files")
    shard_size = args.shard_size or source.shard_size
    val_tokens = (
        (
            args.val_tokens
            if args.val_tokens is not None
            else min(shard_size, 1_000_000)
            if args.source == "files"
            else shard_size
        )
        if stream
        else None
    )
    settings = Settings(
        source=args.source,
        shard_size=shard_size,
        val_tokens=val_tokens,
        max_tokens=args.max_tokens,
        paths=list(args.paths),
        text_field=args.text_field,
        blank_line_docs=args.blank_line_docs,
        val_books=args.val_books,
    )
    prepare(settings, args.out or f"data/{args.source}", mirror=args.mirror, workers=args.workers)
    return 0
