"""The GPT-2 byte-level BPE tokenizer, through tiktoken.

Where the vocabulary files come from, first match wins:
1. an explicit folder holding ``encoder.json`` and ``vocab.bpe`` (OpenAI's file names);
2. ``MIRROR/gpt2_tokenizer`` of the offline data mirror (``$GPT2LAB_MIRROR``, see ``gpt2lab.mirror``);
3. tiktoken's cache (``$TIKTOKEN_CACHE_DIR``, as tiktoken itself looks it up);
4. tiktoken's own download from OpenAI's URLs, when the network answers.
When none of these works, one ``Gpt2LabError`` says what to provide.

A trained tokenizer (``gpt2lab tokenizer train``, see ``tokenizer/train.py``) is a ``TrainedTokenizer`` with the same
methods; ``load_tokenizer(spec)`` gives either kind ("gpt2", or a folder holding tokenizer.json).
"""

from __future__ import annotations

import hashlib
import json
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

# Chat and thinking special tokens, in this order: with GPT-2's tokenizer they take ids 50257, 50258, ... (rows of the
# padded 50,304-row embedding that GPT-2 leaves unused, so a GPT-2 checkpoint becomes a chat model without resizing);
# a trained tokenizer reserves the same names. They are encoded only when asked, never from plain text.
SPECIAL_TOKENS = (
    "<|system_start|>",
    "<|system_end|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<think>",
    "</think>",
    "<|tool_start|>",
    "<|tool_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

SPECIAL_IDS = {token: VOCAB_SIZE + i for i, token in enumerate(SPECIAL_TOKENS)}  # GPT-2's ids for them

_URL_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
_ENCODER_URL = _URL_BASE + "encoder.json"
_VOCAB_URL = _URL_BASE + "vocab.bpe"
_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_VOCAB_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_HASH = hashlib.sha256((_ENCODER_SHA256 + _VOCAB_SHA256).encode()).hexdigest()  # GPT-2's identity: its files


class Tokenizer:
    """GPT-2 BPE. ``encode`` allows ``<|endoftext|>``; ``encode_ordinary`` treats it as text."""

    eot = EOT_ID
    vocab_size = VOCAB_SIZE  # BPE tokens + <|endoftext|>: what a base GPT-2 reads and writes
    n_vocab = VOCAB_SIZE + len(SPECIAL_TOKENS)  # with the chat/thinking special tokens (a chat model's vocab_size)
    name = "gpt2"  # identity recorded in shards and runs (a trained tokenizer: its name and tokenizer.json's sha256)
    hash = GPT2_HASH

    def __init__(self, enc: tiktoken.Encoding, files: tuple[Path, Path] | None = None):
        self.enc = enc
        self.files = files  # (encoder.json, vocab.bpe) where known: exported beside HF weights

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={EOT_TOKEN})

    def special_id(self, token: str) -> int:
        """The id of one of SPECIAL_TOKENS; plain text never encodes to it (encode leaves such strings as text)."""
        if token not in SPECIAL_IDS:
            raise Gpt2LabError(f"{token!r} is not a special token (they are {', '.join(SPECIAL_TOKENS)})")
        return SPECIAL_IDS[token]

    def encode_special(self, token: str) -> list[int]:
        """[special_id(token)]: a special token as ids, to splice between encoded texts."""
        return [self.special_id(token)]

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special={EOT_TOKEN})

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        """Text of ids; a special token's id decodes to its string (tiktoken knows only <|endoftext|>)."""
        if not any(i >= VOCAB_SIZE for i in ids):
            return self.enc.decode(ids, errors="replace")
        pieces, run = [], []
        for i in ids:
            if i >= VOCAB_SIZE:
                pieces += [self.enc.decode(run, errors="replace"), _special_text(i)]
                run = []
            else:
                run.append(i)
        return "".join(pieces) + self.enc.decode(run, errors="replace")

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        if not any(i >= VOCAB_SIZE for ids in batch for i in ids):
            return self.enc.decode_batch(batch, errors="replace")
        return [self.decode(ids) for ids in batch]


def _special_text(i: int) -> str:
    if i - VOCAB_SIZE >= len(SPECIAL_TOKENS):
        raise Gpt2LabError(f"token id {i} is outside the vocabulary ({VOCAB_SIZE + len(SPECIAL_TOKENS)} ids)")
    return SPECIAL_TOKENS[i - VOCAB_SIZE]


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


# ----------------------------------------------------------------------------- trained tokenizers (tokenizer/train.py)

TOKENIZER_JSON = "tokenizer.json"  # Hugging Face tokenizers' own file: the whole tokenizer
TOKENIZER_META = "gpt2lab_tokenizer.json"  # gpt2lab's metadata beside it: name, pattern, corpus, vocab padding


def _no_surrogates(text: str) -> str:
    """Lone surrogates (not valid UTF-8) as U+FFFD, as tiktoken does; the Rust library refuses them."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class TrainedTokenizer:
    """A byte-level BPE from ``gpt2lab tokenizer train`` (a folder with tokenizer.json), run by Hugging Face
    ``tokenizers``; the same methods and meanings as the GPT-2 ``Tokenizer``.

    ``encode`` allows ``<|endoftext|>`` only; ``encode_ordinary`` and every other method treat all special-token
    strings as text (the library would split them out: ``encode_special_tokens`` stops it). The batch methods run
    in the library's own thread pool (``RAYON_NUM_THREADS``); ``num_threads`` is accepted for the same signature.
    """

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.folder = Path(folder)
        path = self.folder / TOKENIZER_JSON
        data = path.read_bytes()
        try:
            self.tok = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:
            raise Gpt2LabError(f"{path} is not a Hugging Face tokenizer.json: {e}") from e
        self.tok.encode_special_tokens = True  # plain text never becomes a special token
        meta_path = self.folder / TOKENIZER_META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.name = meta.get("name", self.folder.resolve().name)
        self.hash = hashlib.sha256(data).hexdigest()  # the identity shards and runs record
        self.vocab_size = self.n_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        eot = self.tok.token_to_id(EOT_TOKEN)
        if eot is None:
            raise Gpt2LabError(f"{path} has no {EOT_TOKEN} token (train one with `gpt2lab tokenizer train`)")
        self.eot = eot
        self.files = None  # not OpenAI's two files: export writes tokenizer.json instead

    def encode(self, text: str) -> list[int]:
        pieces = self.encode_ordinary_batch(text.split(EOT_TOKEN))
        return [i for n, ids in enumerate(pieces) for i in ([self.eot] if n else []) + ids]

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # a lone surrogate
            return self.tok.encode(_no_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        if any(EOT_TOKEN in t for t in texts):
            return [self.encode(t) for t in texts]
        return self.encode_ordinary_batch(texts)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        try:
            return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            return [e.ids for e in self.tok.encode_batch([_no_surrogates(t) for t in texts], add_special_tokens=False)]

    def special_id(self, token: str) -> int:
        """The id of one of SPECIAL_TOKENS; plain text never encodes to it."""
        i = self.tok.token_to_id(token) if token in SPECIAL_TOKENS else None
        if i is None:
            names = ", ".join(SPECIAL_TOKENS)
            raise Gpt2LabError(f"{token!r} is not a special token of {self.name} (they are {names})")
        return i

    def encode_special(self, token: str) -> list[int]:
        """[special_id(token)]: a special token as ids, to splice between encoded texts."""
        return [self.special_id(token)]

    def decode(self, ids: list[int]) -> str:
        """Text of ids (special tokens as their strings); an incomplete UTF-8 character decodes as U+FFFD."""
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return self.tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)


def load_tokenizer(spec: str | Path | None = None, mirror: str | Path | None = None) -> Tokenizer | TrainedTokenizer:
    """A tokenizer from a spec: "gpt2" (or None), a folder holding tokenizer.json (``gpt2lab tokenizer train``,
    an exported model, a prepared dataset), or a folder with OpenAI's encoder.json + vocab.bpe."""
    if spec is None or str(spec) == "gpt2":
        return get_tokenizer(mirror=mirror)
    folder = Path(spec)
    if (folder / TOKENIZER_JSON).is_file():
        return TrainedTokenizer(folder)
    if (folder / "encoder.json").is_file():
        return get_tokenizer(folder)
    raise Gpt2LabError(
        f"tokenizer folder {spec} has no {TOKENIZER_JSON} (a trained tokenizer, from `gpt2lab tokenizer train`) "
        "and no encoder.json (with vocab.bpe: GPT-2's files); or give gpt2"
    )


def token_byte_lengths(tok: Tokenizer | TrainedTokenizer) -> list[int]:
    """UTF-8 bytes each id stands for (special tokens: 0), for bits per byte; index = token id."""
    if isinstance(tok, TrainedTokenizer):  # byte-level: one character of a token's string per byte
        special = {t.content for t in tok.tok.get_added_tokens_decoder().values()}
        tokens = [tok.tok.id_to_token(i) for i in range(tok.vocab_size)]
        return [0 if t is None or t in special else len(t) for t in tokens]
    return [len(tok.enc.decode_single_token_bytes(i)) if i < EOT_ID else 0 for i in range(tok.n_vocab)]
