"""Where documents come from: a small registry of sources, each one generator function.

A source yields ``(split, text)`` in a fixed, deterministic order. ``split`` is ``"train"`` or
``"val"`` when the source decides it (Shakespeare's 90/10 cut, Gutenberg's held-out books) and
``None`` for a plain stream, where ``prepare`` puts the first tokens of the stream into the val
split (see ``prepare.py``), as the reference FineWeb-Edu reproduction uses its first shard.

Offline, every source reads from a mirror folder laid out like ../shared/data (``--mirror`` or
``$GPT2LAB_MIRROR``, looked up by ``gpt2lab.mirror``): ``tinyshakespeare/input.txt``,
``corpus_gutenberg/texts/**.txt`` and ``fineweb-edu/**.parquet|jsonl``. Online, Shakespeare
comes from its canonical URL and FineWeb-Edu from the Hugging Face hub (``datasets`` streaming,
imported only here and only then, after a short probe so that an offline machine fails at once).
Adding a dataset is one ``@register`` function.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpt2lab.errors import Gpt2LabError

Document = tuple[str | None, str]  # (split or None, text)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB_REPO, FINEWEB_CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class SourceOptions:
    """What a user can tell a source on the command line."""

    mirror: Path | None = None  # offline mirror folder (--mirror / $GPT2LAB_MIRROR)
    paths: list[str] = field(default_factory=list)  # files: glob patterns; gutenberg: a books folder
    text_field: str = "text"  # .jsonl / .parquet column holding the document text
    blank_line_docs: bool = False  # .txt: one document per blank-line-separated block
    val_books: int = 4  # gutenberg: books held out as val


@dataclass(frozen=True)
class Source:
    name: str
    documents: Callable[[SourceOptions], Iterator[Document]]
    help: str
    shard_size: int  # default tokens per shard


SOURCES: dict[str, Source] = {}


def register(name: str, help: str, shard_size: int) -> Callable:
    """Decorator adding a document generator to ``SOURCES``."""

    def wrap(fn: Callable[[SourceOptions], Iterator[Document]]) -> Callable:
        SOURCES[name] = Source(name, fn, help, shard_size)
        return fn

    return wrap


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise Gpt2LabError(f"unknown data source '{name}' (known: {', '.join(SOURCES)})")
    return SOURCES[name]


# ----------------------------------------------------------------------------- readers for local files


def read_text(path: Path) -> str:
    """A text file as str: UTF-8 (BOM dropped), else Latin-1; newlines normalised to \\n."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # older Gutenberg files; every byte decodes, nothing is lost
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is a clear error."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise Gpt2LabError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise Gpt2LabError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    for lineno, row in iter_jsonl(path):
        if text_field not in row:
            keys = ", ".join(row)
            raise Gpt2LabError(f"{path}, line {lineno}: no '{text_field}' field (has: {keys}); set --text-field")
        if not isinstance(row[text_field], str):
            raise Gpt2LabError(f"{path}, line {lineno}: field '{text_field}' is not a string")
        yield row[text_field]


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors for a foreign or damaged file vary by version
        raise Gpt2LabError(f"{path} is not a readable parquet file: {e}") from e
    if text_field not in pf.schema_arrow.names:
        raise Gpt2LabError(
            f"{path}: no '{text_field}' column (has: {', '.join(pf.schema_arrow.names)}); set --text-field"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):  # bounded memory
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def file_texts(path: Path, text_field: str = "text", blank_line_docs: bool = False) -> Iterator[str]:
    """Documents of one local file: .txt (whole file or blank-line blocks), .jsonl or .parquet."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = read_text(path)
        if blank_line_docs:
            yield from (b.strip("\n") for b in re.split(r"\n(?:[ \t]*\n)+", text) if b.strip())
        elif text.strip():
            yield text
    elif suffix == ".jsonl":
        yield from _jsonl_texts(path, text_field)
    elif suffix == ".parquet":
        yield from _parquet_texts(path, text_field)
    else:
        raise Gpt2LabError(f"{path}: unsupported file type '{suffix}' (use {', '.join(TEXT_SUFFIXES)})")


def expand_globs(patterns: list[str]) -> list[Path]:
    """Files matching the patterns, sorted within each pattern; a pattern matching nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
        if not matches:
            raise Gpt2LabError(f"no files match '{pattern}' (relative to {Path.cwd()})")
        files += [m for m in matches if m not in files]
    return files


# ----------------------------------------------------------------------------- the sources


@register("shakespeare", "Tiny Shakespeare (1,115,394 bytes), 90/10 character split as in nanoGPT", 10_000_000)
def shakespeare(opts: SourceOptions) -> Iterator[Document]:
    local = opts.mirror / "tinyshakespeare" / "input.txt" if opts.mirror else None
    if local is not None and local.is_file():
        text = local.read_text(encoding="utf-8")
    else:
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                text = r.read().decode("utf-8")
        except Exception as e:
            where = f"{local} does not exist and " if local else ""
            raise Gpt2LabError(
                f"Tiny Shakespeare: {where}downloading {SHAKESPEARE_URL} failed ({e}); "
                "offline, set GPT2LAB_MIRROR (or --mirror) to a folder holding tinyshakespeare/input.txt"
            ) from e
    n = int(len(text) * 0.9)  # nanoGPT's cut, in characters
    yield "train", text[:n]
    yield "val", text[n:]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode set, or one short probe fails), else None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_flag(var):
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return None  # the hub answered, if only with an error status: it is reachable
    except (OSError, ValueError) as e:  # no route, DNS failure, refused, timed out, a malformed HF_ENDPOINT
        return f"{endpoint} does not answer: {getattr(e, 'reason', e)}"
    return None


@register("fineweb-edu", "HuggingFaceFW/fineweb-edu sample-10BT (streamed; offline: MIRROR/fineweb-edu)", 100_000_000)
def fineweb_edu(opts: SourceOptions) -> Iterator[Document]:
    local_dir = opts.mirror / "fineweb-edu" if opts.mirror else None
    local = (
        [p for p in sorted(local_dir.rglob("*")) if p.suffix in (".parquet", ".jsonl")]
        if local_dir and local_dir.is_dir()
        else []
    )
    if local:
        for path in local:  # the same rows the hub stream gives, read from downloaded files
            yield from ((None, t) for t in file_texts(path, opts.text_field))
        return
    offline = hub_unreachable()
    if offline:  # fail at once: the hub client would retry for half a minute, printing each attempt
        where = f"{local_dir} holds no .parquet/.jsonl files and " if local_dir else ""
        raise Gpt2LabError(
            f"FineWeb-Edu: {where}the Hugging Face hub cannot be reached ({offline}); offline, use --mirror DIR "
            "with the dataset's parquet files in DIR/fineweb-edu/, or `gpt2lab data prepare files 'DIR/*.parquet'`"
        )
    try:
        import datasets

        rows = datasets.load_dataset(FINEWEB_REPO, name=FINEWEB_CONFIG, split="train", streaming=True)
        for row in rows:
            yield None, row[opts.text_field]
    except Gpt2LabError:
        raise
    except Exception as e:  # no network, no hub access, a changed dataset: one clear message
        where = f"{local_dir} holds no .parquet/.jsonl files and " if local_dir else ""
        raise Gpt2LabError(
            f"FineWeb-Edu: {where}streaming {FINEWEB_REPO} ({FINEWEB_CONFIG}) from the hub failed: {e}. "
            "Offline, put the dataset's parquet files in MIRROR/fineweb-edu/ and set GPT2LAB_MIRROR or --mirror"
        ) from e


@register("files", "local .txt/.jsonl/.parquet files by glob (val: the first ~10%, at most 1M tokens)", 10_000_000)
def files(opts: SourceOptions) -> Iterator[Document]:
    if not opts.paths:
        raise Gpt2LabError("the 'files' source needs at least one glob pattern, e.g. 'corpus/*.jsonl'")
    for path in expand_globs(opts.paths):
        yield from ((None, t) for t in file_texts(path, opts.text_field, opts.blank_line_docs))


START_RE = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE)
END_RE = re.compile(r"^\*\*\* ?END OF.*$", re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """The book between the ``*** START OF`` and ``*** END OF`` lines (licence header and footer removed)."""
    start, end = START_RE.search(text), END_RE.search(text)
    begin = start.end() if start else 0
    stop = end.start() if end and end.start() > begin else len(text)
    return text[begin:stop].strip()


def held_out_books(names: list[str], n: int) -> set[str]:
    """The ``n`` books with the smallest sha256 of their relative path: stable as the folder grows."""
    return set(sorted(names, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:n])


@register("gutenberg", "a folder of Project Gutenberg books (default MIRROR/corpus_gutenberg/texts)", 10_000_000)
def gutenberg(opts: SourceOptions) -> Iterator[Document]:
    if opts.paths:
        folder = Path(opts.paths[0]).expanduser()
    elif opts.mirror:
        folder = opts.mirror / "corpus_gutenberg" / "texts"
    else:
        raise Gpt2LabError("gutenberg has no online source: give a folder of books or set GPT2LAB_MIRROR / --mirror")
    if not folder.is_dir():
        raise Gpt2LabError(f"Gutenberg folder {folder} does not exist")
    books = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*.txt"))}
    if not books:
        raise Gpt2LabError(f"Gutenberg folder {folder} holds no .txt books")
    if len(books) <= opts.val_books:
        raise Gpt2LabError(
            f"Gutenberg folder {folder} has {len(books)} books; need more than --val-books {opts.val_books}"
        )
    val = held_out_books(list(books), opts.val_books)
    for name, path in books.items():
        text = strip_gutenberg(read_text(path))
        if text:
            yield ("val" if name in val else "train"), text
