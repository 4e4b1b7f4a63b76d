"""``gpt2lab data prepare``: documents -> GPT-2 tokens (in parallel worker processes) -> shards + manifest.

The pipeline, as llm.c's ``dev/data/fineweb.py`` but resumable and with bounded memory:
- the source's documents are tokenized by a pool of worker processes (``encode.py``); the tokens come
  back in document order, with a bounded look-ahead, so a corpus of any size streams through in bounded memory;
- every document becomes ``[<|endoftext|>] + encode_ordinary(text)``, with GPT-2's tokenizer or a trained
  one (``--tokenizer DIR``, from ``gpt2lab tokenizer train``: its tokenizer.json is copied into the output
  folder, and the manifest records its name and sha256); tokens are uint16 up to a vocabulary of 65,535,
  uint32 above (see ``shards.py``);
- each split fills shards of exactly ``shard_size`` tokens (a document may continue in the next
  shard); the last shard of a split is partial;
- a plain stream (no split from the source) gives its first tokens to the single shard
  ``val_000000.bin``: with ``val_tokens`` alone, the whole documents that start before token
  ``val_tokens``; with ``val_fraction`` too (``files`` by default), about
  ``min(val_tokens, val_fraction * corpus)``. The corpus size is learnt by holding the documents back
  (at most ``val_tokens / val_fraction`` tokens, 20 MB) until either that many tokens have come or the
  stream ends; then the cut falls between whole documents when that lands within twice the target,
  else inside a document (one big .txt, as nanoGPT's 90/10). A corpus too small for a val split of
  ``MIN_VAL_TOKENS`` is prepared as train only, with a warning;
- so the shards are a deterministic function of the document stream and the settings. Each shard
  is written under a temporary name and renamed, then ``prepare_state.json`` records it with the
  stream position where the next shard of its split begins. A rerun of the same command skips the
  documents already in complete shards (without tokenizing them) and produces byte-identical shards;
- the output folder is created with the first shard, so a run that fails before (no files match,
  the hub unreachable, a bad input line) leaves nothing behind; ``manifest.json`` is written last:
  a folder with a manifest is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2lab.data.encode import load_tokenizer, tokenize_stream, worker_files
from gpt2lab.data.shards import (
    MAGIC,
    MAGIC_U32,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    TOKEN_DTYPE,
    VERSION,
    VERSION_U32,
    read_header,
    shard_name,
    token_dtype,
    write_json,
    write_shard,
)
from gpt2lab.data.sources import SourceOptions, get_source
from gpt2lab.errors import Gpt2LabError
from gpt2lab.mirror import mirror_dir
from gpt2lab.tokenizer.bpe import TOKENIZER_JSON, TOKENIZER_META, Tokenizer, TrainedTokenizer

STATE = "prepare_state.json"
FILES_VAL_TOKENS, FILES_VAL_FRACTION = 1_000_000, 0.1  # `files` default: val is min(1M tokens, ~10% of the corpus)
MIN_VAL_TOKENS = 2  # one (input, target) pair; a corpus whose val share is smaller has no val split


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
    val_fraction: float | None = None  # plain streams: val is at most this share of the corpus (see above)
    tokenizer: str = "gpt2"  # gpt2, or a trained tokenizer's tokenizer.json sha256 (set by prepare from --tokenizer)


def _same_settings(saved: dict | None, settings: Settings) -> bool:
    """Whether recorded settings are these (a record from before a field existed has that field's default)."""
    try:
        return Settings(**(saved or {})) == settings
    except TypeError:  # a field this version does not know
        return False


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
            self.out.mkdir(parents=True, exist_ok=True)  # created with the first shard: a failed start leaves none
            tokens = np.concatenate(self.parts)
            sha = write_shard(self.out / name, tokens, tokens.dtype)  # uint16, or uint32 for a large vocabulary
            self.shards.append({"file": name, "tokens": self.fill, "sha256": sha})
            self.parts, self.fill = [], 0
            self.resume_doc, self.resume_offset, self.resume_total = next_pos
            on_shard()

    def state(self) -> dict:
        return {"shards": self.shards, "next": [self.resume_doc, self.resume_offset, self.resume_total]}


# ----------------------------------------------------------------------------- the val split of a plain stream


class PlainStream:
    """Routes a plain stream's documents: the first ones (up to ``val_end``) to val, the rest to train.

    ``val_end = [doc, offset]``: the val split holds every token before token ``offset`` of document ``doc``.
    """

    def __init__(self, settings: Settings, writers: dict[str, SplitWriter], val_end: list[int] | None, on_shard):
        self.settings, self.writers, self.on_shard = settings, writers, on_shard
        self.val_end = val_end
        self.pending: list[tuple[int, np.ndarray, int]] = []  # (doc, tokens, tokens before it), held back
        if settings.val_fraction:
            self.hold_until = int(settings.val_tokens / settings.val_fraction)  # from here val is val_tokens
        if val_end is None:
            writers["val"].shard_size = None  # the val split is one shard, flushed at val_end

    def add(self, doc: int, tokens: np.ndarray, total_before: int) -> None:
        if self.val_end is not None:
            self._route(doc, tokens, total_before)
        elif not self.settings.val_fraction:  # a fixed val size: whole documents up to val_tokens
            if total_before >= self.settings.val_tokens:
                self._set_val_end(doc, 0, total_before)
                self._route(doc, tokens, total_before)
            else:
                self.writers["val"].add(tokens, doc, total_before, self.on_shard)
        else:
            self.pending.append((doc, tokens, total_before))
            if total_before + len(tokens) >= self.hold_until:
                self._release(self.settings.val_tokens)

    def finish(self, total: int) -> None:
        """The stream ended: a corpus still held back is smaller than ``hold_until``; val is its fraction."""
        if self.pending:
            self._release(int(total * self.settings.val_fraction))

    def _release(self, target: int) -> None:
        """Fix val_end for a val split of about ``target`` tokens, then route the held-back documents."""
        self._set_val_end(*self._boundary(target))
        pending, self.pending = self.pending, []
        for doc, tokens, total_before in pending:
            self._route(doc, tokens, total_before)

    def _boundary(self, target: int) -> tuple[int, int, int]:
        """(doc, offset, tokens before doc) where val ends: whole documents if within 2x target, else a cut."""
        if target < MIN_VAL_TOKENS:
            doc, _, total_before = self.pending[0]
            return doc, 0, total_before  # no val split
        for doc, _, total_before in self.pending:
            if total_before >= target:  # the documents before this one hold at least target tokens
                if total_before <= 2 * target:
                    return doc, 0, total_before
                break
        for doc, tokens, total_before in self.pending:  # few, long documents: cut inside the one holding token target
            if total_before + len(tokens) > target:
                return doc, target - total_before, total_before
        raise AssertionError("a val target beyond the held-back tokens")  # target < total by construction

    def _set_val_end(self, doc: int, offset: int, total_before: int) -> None:
        self.val_end = [doc, offset]
        train = self.writers["train"]
        if offset and not train.shards:  # train begins inside this document: its writer skips the val part
            train.resume_doc, train.resume_offset, train.resume_total = doc, offset, total_before

    def _route(self, doc: int, tokens: np.ndarray, total_before: int) -> None:
        val_doc, offset = self.val_end
        if doc < val_doc:
            self.writers["val"].add(tokens, doc, total_before, self.on_shard)
            return
        if doc == val_doc:  # the val split is complete here
            self.writers["val"].add(tokens[:offset], doc, total_before, self.on_shard)
            self.writers["val"].flush((doc, offset, total_before), self.on_shard)
        self.writers["train"].add(tokens, doc, total_before, self.on_shard)


# ----------------------------------------------------------------------------- the run


def _load_state(out: Path, settings: Settings) -> dict:
    """The state of an unfinished run in ``out`` with the same settings, or a fresh one."""
    fresh = {"settings": asdict(settings), "splits": {}, "val_end": None}
    if not (out / STATE).is_file():
        return fresh
    state = json.loads((out / STATE).read_text())
    if not _same_settings(state.get("settings"), settings):
        raise Gpt2LabError(
            f"{out} holds an unfinished prepare run with other settings ({state.get('settings')}); "
            "run it with those settings to finish, or delete the folder / choose another --out"
        )
    for saved in state["splits"].values():
        for shard in saved["shards"]:
            if read_header(out / shard["file"]) != shard["tokens"]:
                raise Gpt2LabError(f"{out / shard['file']} does not match {out / STATE}; delete {out} and start over")
    if isinstance(state["val_end"], int):  # written by an earlier version: a document index
        state["val_end"] = [state["val_end"], 0]
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


def _checked_documents(settings: Settings, opts: SourceOptions, start: int, writers: dict):
    """The documents, with the first one already read: the source's own checks (globs that match nothing,
    an unreachable hub, a missing mirror file) fail here, before a progress bar or a folder appears."""
    docs = _documents(settings, opts, start, writers)
    first = next(docs, None)
    return docs if first is None else itertools.chain([first], docs)


class _Run:
    """The split writers of one run and the router of a plain stream; the run state is saved after each shard."""

    def __init__(self, out: Path, settings: Settings, state: dict):
        self.out, self.settings = out, settings
        self.writers = {s: SplitWriter(out, s, settings.shard_size, state["splits"].get(s)) for s in ("train", "val")}
        has_val_cut = settings.val_tokens is not None
        self.plain = PlainStream(settings, self.writers, state["val_end"], self.save_state) if has_val_cut else None

    def save_state(self) -> None:
        splits = {s: w.state() for s, w in self.writers.items()}
        val_end = self.plain.val_end if self.plain else None
        write_json(self.out / STATE, {"settings": asdict(self.settings), "splits": splits, "val_end": val_end})

    def add(self, doc: int, split: str | None, tokens: np.ndarray, total_before: int) -> None:
        if split is None:
            self.plain.add(doc, tokens, total_before)
        else:
            self.writers[split].add(tokens, doc, total_before, self.save_state)

    def finish(self, num_docs: int, total: int) -> None:
        """The stream has ended: write what is left in every split."""
        if self.plain:
            self.plain.finish(total)
        for w in self.writers.values():
            w.flush((num_docs, 0, total), self.save_state)


def _consume(stream, run: _Run, bar: tqdm, start: int, total: int) -> tuple[int, int]:
    """Feed tokenized documents to the writers until the stream or --max-tokens ends; (documents, tokens)."""
    max_tokens = run.settings.max_tokens
    num_docs, t0, total0 = start, time.time(), total
    for idx, splits, tokens, lengths in stream:
        pos = 0
        for doc, split, n in zip(idx, splits, lengths.tolist()):
            doc_tokens, pos = tokens[pos : pos + n], pos + n
            if max_tokens is not None:
                doc_tokens = doc_tokens[: max(max_tokens - total, 0)]
            run.add(doc, split, doc_tokens, total)
            total += len(doc_tokens)
            num_docs = doc + 1
            if max_tokens is not None and total >= max_tokens:
                break
        bar.update(num_docs - bar.n)  # documents read, as the manifest counts them (also with --max-tokens)
        rate = (total - total0) / max(time.time() - t0, 1e-9)
        bar.set_postfix_str(f"{total:,} tokens, {rate:,.0f} tok/s", refresh=False)
        if max_tokens is not None and total >= max_tokens:
            break
    return num_docs, total


def prepare(
    settings: Settings,
    out: str | Path,
    *,
    mirror: str | Path | None = None,
    workers: int | None = None,
    quiet: bool = False,
    start_method: str | None = None,
    tokenizer: str | Path | None = None,
) -> dict:
    """Tokenize a source into shards under ``out``; resume an unfinished run; return the manifest.

    ``start_method``: how tokenizer worker processes start (None: the platform's default; see tokenize_stream).
    ``tokenizer``: "gpt2" (None) or a folder holding a trained tokenizer.json; ``settings.tokenizer`` is set from it.
    """
    out = Path(out)
    tok = load_tokenizer(mirror, tokenizer)
    settings = dataclasses.replace(settings, tokenizer="gpt2" if isinstance(tok, Tokenizer) else tok.hash)
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if not _same_settings(manifest.get("settings"), settings):
            raise Gpt2LabError(f"{out} already holds a dataset prepared with other settings; choose another --out")
        if not quiet:
            print(f"{out} is already complete ({MANIFEST} exists); nothing to do")
        return manifest
    _check_settings(settings)
    run = _Run(out, settings, _load_state(out, settings))
    opts = SourceOptions(
        mirror_dir(mirror), settings.paths, settings.text_field, settings.blank_line_docs, settings.val_books
    )
    start, total = min((w.resume_doc, w.resume_total) for w in run.writers.values())
    docs = _checked_documents(settings, opts, start, run.writers)
    files = worker_files(tok)
    if start and not quiet:
        done = sum(len(w.shards) for w in run.writers.values())
        print(f"resuming {out}: {done} shard(s) complete, continuing from document {start:,}")
    bar = tqdm(desc=f"prepare {settings.source}", unit=" docs", initial=start, dynamic_ncols=True, disable=quiet)
    stream = tokenize_stream(docs, workers or os.cpu_count() or 1, files, start_method)
    try:
        num_docs, total = _consume(stream, run, bar, start, total)
    finally:
        stream.close()  # stops the worker pool, also on an error
        bar.close()
    run.finish(num_docs, total)
    return _finish(out, settings, run.writers, num_docs, quiet, tok)


def _check_settings(settings: Settings) -> None:
    if settings.shard_size < 1:
        raise Gpt2LabError(f"--shard-size must be positive, got {settings.shard_size}")
    if settings.val_tokens is not None and settings.val_tokens < 0:
        raise Gpt2LabError(f"--val-tokens must be 0 or more, got {settings.val_tokens}")
    if settings.max_tokens is not None and settings.max_tokens < 1:
        raise Gpt2LabError(f"--max-tokens must be positive, got {settings.max_tokens}")


def _tokenizer_record(out: Path, tok: Tokenizer | TrainedTokenizer) -> tuple[dict, dict]:
    """The manifest's tokenizer and shard_format entries; a trained tokenizer's files are copied into ``out``."""
    if isinstance(tok, TrainedTokenizer):
        for name in (TOKENIZER_JSON, TOKENIZER_META):
            if (tok.folder / name).is_file():
                shutil.copyfile(tok.folder / name, out / name)  # the dataset names its tokenizer and carries it
    dtype = token_dtype(tok.vocab_size)
    magic, version = (MAGIC, VERSION) if dtype == TOKEN_DTYPE else (MAGIC_U32, VERSION_U32)
    record = {"name": tok.name, "hash": tok.hash, "vocab_size": tok.vocab_size, "eot": tok.eot}
    return record, {"header_int32": 256, "magic": magic, "version": version, "dtype": dtype.name}


def _finish(out: Path, settings: Settings, writers: dict[str, SplitWriter], num_docs: int, quiet: bool, tok) -> dict:
    """Check that train has tokens, then write the manifest (last) and drop the run state."""
    counts = {s: sum(sh["tokens"] for sh in w.shards) for s, w in writers.items()}
    total = sum(counts.values())
    if num_docs == 0 or total == 0:
        raise Gpt2LabError(f"source '{settings.source}' produced no documents {settings.paths or ''}".rstrip())
    if counts["train"] == 0:
        hint = f"; delete {out} and run again with a lower --val-tokens (now {settings.val_tokens:,})"
        raise Gpt2LabError(
            f"source '{settings.source}' gave the train split no tokens ({total:,} in all)"
            + (hint if settings.val_tokens else "")
        )
    if counts["val"] == 0:
        why = "--val-tokens 0" if settings.val_tokens == 0 else f"{total:,} tokens are too few to hold some out"
        print(
            f"warning: {out} has no val split ({why}); all tokens are train, and val loss will be unavailable "
            "when training on it",
            file=sys.stderr,
        )
    splits = {s: {"tokens": counts[s], "shards": w.shards} for s, w in writers.items() if counts[s]}
    tokenizer, shard_format = _tokenizer_record(out, tok)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "source": settings.source,
        "settings": asdict(settings),
        "tokenizer": tokenizer,
        "shard_format": shard_format,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "documents": num_docs,
        "splits": splits,
    }
    write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    if not quiet:
        done = ", ".join(f"{s} {e['tokens']:,} tokens in {len(e['shards'])} shard(s)" for s, e in splits.items())
        print(f"wrote {out}: {done}")
    return manifest


def val_settings(source: str, val_tokens: int | None, shard_size: int) -> tuple[int | None, float | None]:
    """(val_tokens, val_fraction) for a source: the user's --val-tokens exactly, else the source's default."""
    if source not in ("fineweb-edu", "files"):
        return None, None  # the source splits itself
    if val_tokens is not None:
        return val_tokens, None
    if source == "fineweb-edu":
        return shard_size, None  # the reference reproduction's first shard
    return FILES_VAL_TOKENS, FILES_VAL_FRACTION


def prepare_command(args: argparse.Namespace) -> int:
    """CLI entry: build the settings from the parsed arguments and run ``prepare``."""
    shard_size = args.shard_size or get_source(args.source).shard_size
    val_tokens, val_fraction = val_settings(args.source, args.val_tokens, shard_size)
    settings = Settings(
        source=args.source,
        shard_size=shard_size,
        val_tokens=val_tokens,
        max_tokens=args.max_tokens,
        paths=list(args.paths),
        text_field=args.text_field,
        blank_line_docs=args.blank_line_docs,
        val_books=args.val_books,
        val_fraction=val_fraction,
    )
    out = args.out or f"data/{args.source}"
    prepare(settings, out, mirror=args.mirror, workers=args.workers, tokenizer=args.tokenizer)
    return 0
