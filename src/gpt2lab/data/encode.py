"""Documents -> GPT-2 tokens in parallel worker processes: the tokenization step of ``gpt2lab data prepare``.

- the documents are grouped into tasks of a few hundred KB (``TASK_DOCS`` documents or ``TASK_CHARS``
  characters) and tokenized by a pool of worker processes; results come back in document order, and at
  most ``2 * workers + 2`` tasks are in flight, so a corpus of any size streams through in bounded memory;
- workers load the tokenizer from the files the main process used (``worker_files``), so they start the
  same under fork, spawn or forkserver; a forked worker finds the parent's parsed tokenizer and reuses it;
- every document becomes ``[<|endoftext|>] + encode_ordinary(text)``; tokens are uint16 up to a vocabulary
  of 65,535, uint32 above (see ``shards.py``).

``prepare.py`` writes the tokens into shards.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from gpt2lab.data.shards import token_dtype
from gpt2lab.errors import Gpt2LabError
from gpt2lab.mirror import mirror_dir
from gpt2lab.tokenizer.bpe import Tokenizer, TrainedTokenizer, get_tokenizer, load_files
from gpt2lab.tokenizer.bpe import load_tokenizer as load_spec

TASK_DOCS, TASK_CHARS = 512, 1 << 18  # a task: up to 512 documents or 256K characters

_TOK = None  # this process's tokenizer, set by _use_tokenizer
_LOADED: dict = {}  # tokenizer files -> Tokenizer; a forked worker finds the parent's here and skips the 0.3 s parse


def load_tokenizer(mirror: str | Path | None = None, spec: str | Path | None = None) -> Tokenizer | TrainedTokenizer:
    """GPT-2's tokenizer (mirror, tiktoken's cache or the web) or a trained one (``spec``), once per process."""
    key = ("lookup", str(mirror_dir(mirror))) if spec in (None, "gpt2") else ("spec", str(Path(spec).resolve()))
    if key not in _LOADED:
        _LOADED[key] = load_spec(spec, mirror)
    return _LOADED[key]


def worker_files(tok: Tokenizer | TrainedTokenizer) -> tuple[str, ...] | None:
    """The files a worker loads the tokenizer from (picklable), registered so forked workers reuse ``tok``."""
    if isinstance(tok, TrainedTokenizer):
        files = ("trained", str(tok.folder.resolve()))
    elif not tok.files:
        return None  # tiktoken without a cache: each worker does the same lookup
    else:
        files = (str(tok.files[0]), str(tok.files[1]))
    _LOADED.setdefault(files, tok)
    return files


def _use_tokenizer(files: tuple[str, ...] | None) -> None:
    """Make ``files`` (None: the default lookup) this process's tokenizer for ``encode_documents``."""
    global _TOK
    if files not in _LOADED:
        if files and files[0] == "trained":
            _LOADED[files] = TrainedTokenizer(files[1])
        else:
            _LOADED[files] = load_files(*files) if files else get_tokenizer()
    _TOK = _LOADED[files]


def _start_worker(files: tuple[str, str] | None) -> None:
    """Pool initializer: a module-level function with picklable arguments, as spawn requires."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it stops the pool)
    _use_tokenizer(files)


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of several documents, each preceded by <|endoftext|>, concatenated; and each one's length."""
    tokens: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        before = len(tokens)
        tokens.append(_TOK.eot)
        tokens.extend(_TOK.encode_ordinary(text))
        lengths[i] = len(tokens) - before
    return np.array(tokens, dtype=token_dtype(_TOK.vocab_size)), lengths


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


def tokenize_stream(
    docs: Iterator[tuple[int, str | None, str]],
    workers: int,
    files: tuple[str, str] | None,
    start_method: str | None = None,
):
    """Yield (indices, splits, tokens, lengths) per task, in document order, with bounded look-ahead.

    ``start_method`` picks how worker processes start ("fork", "spawn", "forkserver"; None: the platform's
    default, spawn on macOS and Windows).
    """
    if workers <= 1:  # in-process: no pickling, the honest single-core baseline
        _use_tokenizer(files)
        for idx, splits, texts in _tasks(docs):
            yield idx, splits, *encode_documents(texts)
        return
    context = multiprocessing.get_context(start_method)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(files,))
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
