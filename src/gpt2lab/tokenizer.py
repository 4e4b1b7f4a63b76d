"""The GPT-2 byte-level BPE tokenizer, through tiktoken.

Where the vocabulary files come from, first match wins:
1. an explicit folder holding ``encoder.json`` and ``vocab.bpe`` (OpenAI's file names);
2. ``MIRROR/gpt2_tokenizer`` of the offline data mirror (``$GPT2LAB_MIRROR``, see ``gpt2lab.mirror``);
3. tiktoken's cache (``$TIKTOKEN_CACHE_DIR``, as tiktoken itself looks it up);
4. tiktoken's own download from OpenAI's URLs, when the network answers.
When none of these works, one ``Gpt2LabError`` says what to provide.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation regex

from gpt2lab.errors import Gpt2LabError
from gpt2lab.mirror import ENV as MIRROR_ENV
from gpt2lab.mirror import mirror_dir

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257

_URL_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
_ENCODER_URL = _URL_BASE + "encoder.json"
_VOCAB_URL = _URL_BASE + "vocab.bpe"
_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_VOCAB_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


class Tokenizer:
    """GPT-2 BPE. ``encode`` allows ``<|endoftext|>``; ``encode_ordinary`` treats it as text."""

    eot = EOT_ID
    vocab_size = VOCAB_SIZE

    def __init__(self, enc: tiktoken.Encoding, files: tuple[Path, Path] | None = None):
        self.enc = enc
        self.files = files  # (encoder.json, vocab.bpe) where known: exported beside HF weights

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={EOT_TOKEN})

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special={EOT_TOKEN})

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return self.enc.decode_batch(batch, errors="replace")


def _from_files(folder: Path) -> Tokenizer:
    encoder, vocab = folder / "encoder.json", folder / "vocab.bpe"
    for f in (encoder, vocab):
        if not f.is_file():
            raise Gpt2LabError(f"tokenizer folder {folder} has no {f.name} (expected encoder.json and vocab.bpe)")
    return load_files(encoder, vocab)


def load_files(encoder: str | Path, vocab: str | Path) -> Tokenizer:
    """The tokenizer from OpenAI's two files under any names (a folder's, or tiktoken's hashed cache names)."""
    folder, encoder, vocab = Path(vocab).parent, Path(encoder), Path(vocab)
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # local files: tiktoken must not copy them into its cache
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(str(vocab), str(encoder), _VOCAB_SHA256, _ENCODER_SHA256)
    except Exception as e:  # a hash mismatch or a malformed file: name the folder
        raise Gpt2LabError(f"tokenizer files in {folder} are not OpenAI's GPT-2 files: {e}") from e
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )
    return Tokenizer(enc, (encoder, vocab))


def _tiktoken_cache_dir() -> Path | None:
    """The folder tiktoken caches downloads in, following tiktoken's own lookup."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _cached_files() -> tuple[Path, Path] | None:
    cache = _tiktoken_cache_dir()
    if cache is None:
        return None
    files = tuple(cache / hashlib.sha1(url.encode()).hexdigest() for url in (_ENCODER_URL, _VOCAB_URL))
    return files if all(f.is_file() for f in files) else None


def _online(timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(_VOCAB_URL, method="HEAD"), timeout=timeout)
        return True
    except Exception:
        return False


def get_tokenizer(folder: str | Path | None = None, mirror: str | Path | None = None) -> Tokenizer:
    """The GPT-2 tokenizer: from a folder, the data mirror (``mirror`` or $GPT2LAB_MIRROR), tiktoken cache or web."""
    if folder is not None:
        return _from_files(Path(folder))
    root = mirror_dir(mirror)  # a mirror variable naming a missing folder is an error, not a silent fallback
    if root is not None and (root / "gpt2_tokenizer" / "vocab.bpe").is_file():
        return _from_files(root / "gpt2_tokenizer")
    cached = _cached_files()
    if cached is not None or _online():
        try:
            return Tokenizer(tiktoken.get_encoding("gpt2"), cached or _cached_files())
        except Exception as e:
            raise Gpt2LabError(f"could not load tiktoken's gpt2 encoding: {e}") from e
    looked = f" ({root / 'gpt2_tokenizer'} does not exist)" if root is not None else f" ({MIRROR_ENV} is not set)"
    raise Gpt2LabError(
        "the GPT-2 tokenizer files are not available offline and the network does not answer.\n"
        "Provide one of: TIKTOKEN_CACHE_DIR=<a tiktoken cache holding the gpt2 files> "
        f"(e.g. ../shared/data/tiktoken_cache), {MIRROR_ENV}=<a data mirror with gpt2_tokenizer/>{looked}, "
        "or a folder with encoder.json and vocab.bpe (--tokenizer DIR)."
    )
