"""Train your own byte-level BPE tokenizer (Hugging Face ``tokenizers``), and compare tokenizers on held-out text.

``gpt2lab tokenizer train CORPUS --vocab-size N --out DIR`` streams a corpus (a registered source from
``gpt2lab.data.sources``, or globs of local files) into the library's BPE trainer (Rust; no merge loop here)
and writes DIR/tokenizer.json (the library's own format: ``tokenizers.Tokenizer.from_file`` and
``transformers.PreTrainedTokenizerFast`` read it) plus DIR/gpt2lab_tokenizer.json (name, pattern, vocabulary,
corpus, time). Like GPT-2's, the tokenizer is byte-level: every text encodes (no unknown token) and decodes back.

How it departs from GPT-2's tokenizer, and how it matches:
- the pre-tokenisation split pattern is chosen (``--pattern``): ``gpt2`` is GPT-2's own regex, ``gpt4`` the
  cl100k_base one (GPT-4), which splits digits into groups of at most 3 and keeps runs of newlines apart
  (see PATTERNS for where each comes from);
- the layout follows GPT-2's: the BPE tokens take ids 0..n-1, then ``<|endoftext|>`` (id n, the document
  separator), then the chat/thinking tokens of ``gpt2lab.tokenizer.bpe.SPECIAL_TOKENS`` in order; ``--vocab-size``
  counts them all. The model pads its embedding to a multiple of 64 (``padded_vocab_size`` in the metadata);
- special tokens are added after training, so no BPE merge ever spans one, and plain text never encodes to one.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from gpt2lab.data.sources import SOURCES, SourceOptions, get_source
from gpt2lab.errors import Gpt2LabError
from gpt2lab.mirror import mirror_dir
from gpt2lab.tokenizer.bpe import (
    EOT_TOKEN,
    SPECIAL_TOKENS,
    TOKENIZER_JSON,
    TOKENIZER_META,
    TrainedTokenizer,
    load_tokenizer,
)

PATTERNS = {
    # GPT-2: openai/gpt-2, src/encoder.py (Encoder.__init__, self.pat); also tokenizers' ByteLevel default
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # GPT-4: cl100k_base's pat_str in openai/tiktoken, tiktoken_ext/openai_public.py (cl100k_base()), with one
    # change: "\p{N}{1,3}+" there is possessive, but in Oniguruma (the library's regex engine) "{1,3}+" repeats the
    # group, so a run of digits would be one piece; "{1,3}" is what tiktoken means. (nanochat's tokenizer.py
    # drops the same "+" for the same reason, with groups of at most 2.)
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
}
RESERVED = (EOT_TOKEN, *SPECIAL_TOKENS)  # appended after the BPE tokens, in this order
PAD_MULTIPLE = 64  # the model's embedding rows: a multiple of 64 keeps the LM head's matmul on fast tiles
MIN_VOCAB = 256 + len(RESERVED)  # every byte, then the special tokens


@dataclass
class BpeConfig:
    """How a tokenizer is trained (recorded in its gpt2lab_tokenizer.json)."""

    vocab_size: int = 16384  # all tokens: 256 bytes + merges + <|endoftext|> + the chat/thinking tokens
    pattern: str = "gpt4"  # pre-tokenisation split: gpt2 (GPT-2's regex) or gpt4 (cl100k: digits in groups of <= 3)
    min_frequency: int = 2  # a pair seen fewer times is never merged
    max_chars: int | None = None  # train on the first N characters of the corpus (a sample); None = all of it

    def validate(self) -> None:
        if self.vocab_size < MIN_VOCAB + 1:
            raise Gpt2LabError(f"--vocab-size must be at least {MIN_VOCAB + 1} (256 bytes + {len(RESERVED)} special)")
        if self.pattern not in PATTERNS:
            raise Gpt2LabError(f"--pattern must be one of {', '.join(PATTERNS)} (got {self.pattern!r})")
        if self.max_chars is not None and self.max_chars < 1:
            raise Gpt2LabError(f"--max-chars must be positive (got {self.max_chars})")


def padded(vocab_size: int) -> int:
    """The model's embedding rows for a vocabulary: rounded up to a multiple of 64."""
    return -(-vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE


# ----------------------------------------------------------------------------- corpora


def wikitext2_articles(mirror: str | Path | None = None) -> Iterator[str]:
    """WikiText-2's test file (MIRROR/wikitext2/wiki.test.tokens) as it is (" @-@ " and all), one text per article."""
    root = mirror_dir(mirror)
    path = root / "wikitext2" / "wiki.test.tokens" if root else None
    if path is None or not path.is_file():
        raise Gpt2LabError(f"wikitext2: {path or 'no mirror'}: set GPT2LAB_MIRROR (or --mirror) to the data mirror")
    article: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if ARTICLE_TITLE.match(line) and "".join(article).strip():
            yield "".join(article)
            article = []
        article.append(line)
    if "".join(article).strip():
        yield "".join(article)


ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")  # " = Robert Boulter = ": a new article (" = = Career = = ": a section)


def documents(corpus: list[str], held_out: bool, mirror: str | Path | None = None) -> Iterator[str]:
    """Texts of a corpus: a registered source name (+ its paths), ``wikitext2`` (held-out only) or file globs.

    ``held_out=False`` gives the source's train documents (and every document of a plain stream);
    ``held_out=True`` its val documents (Gutenberg's held-out books, Shakespeare's last 10%), or all of a
    plain stream (files, fineweb-edu), which has no split of its own.
    """
    if not corpus:
        raise Gpt2LabError("name a corpus: a source (" + ", ".join(SOURCES) + ") or file globs ('corpus/*.txt')")
    if corpus == ["wikitext2"]:
        if not held_out:
            raise Gpt2LabError("wikitext2 is an evaluation set: compare on it (--on wikitext2), do not train on it")
        yield from wikitext2_articles(mirror)
        return
    name, paths = (corpus[0], corpus[1:]) if corpus[0] in SOURCES else ("files", corpus)
    opts = SourceOptions(mirror=mirror_dir(mirror), paths=list(paths))
    skip = "train" if held_out else "val"
    for split, text in get_source(name).documents(opts):
        if split != skip:
            yield text


def take_chars(texts: Iterable[str], max_chars: int | None, bar: tqdm | None = None) -> Iterator[str]:
    """The texts up to ``max_chars`` characters in all (the last one cut), counted on the progress bar."""
    left = max_chars
    for text in texts:
        if left is not None:
            text = text[:left]
            left -= len(text)
        if bar is not None:
            bar.update(len(text))
        if text:
            yield text
        if left is not None and left <= 0:
            return


# ----------------------------------------------------------------------------- training


def _pieces(texts: Iterable[str], size: int = 1 << 20) -> Iterator[str]:
    """Long documents (whole books) cut into ~1 MB pieces at newlines, so the trainer's batches stay small."""
    for text in texts:
        start = 0
        while start < len(text):
            end = len(text) if len(text) - start <= size else text.rfind("\n", start, start + size) + 1
            end = end if end > start else start + size
            yield text[start:end]
            start = end


def train_bpe(texts: Iterable[str], cfg: BpeConfig, out: str | Path, name: str | None = None, corpus: str = "") -> dict:
    """Train on ``texts`` and write OUT/tokenizer.json + OUT/gpt2lab_tokenizer.json; return the metadata."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import __version__ as tokenizers_version

    cfg.validate()
    out = Path(out)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERNS[cfg.pattern]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> GPT-2's printable chars
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - len(RESERVED),
        min_frequency=cfg.min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not: nothing is unknown
        show_progress=False,  # our bar counts characters read; the merges follow in one call
    )
    t0 = time.time()
    bar = tqdm(desc="read corpus", unit=" chars", unit_scale=True, total=cfg.max_chars, dynamic_ncols=True)
    chars = 0

    def counted() -> Iterator[str]:
        nonlocal chars
        for piece in _pieces(take_chars(texts, cfg.max_chars, bar)):
            chars += len(piece)
            yield piece

    try:
        tok.train_from_iterator(counted(), trainer)
    finally:
        bar.close()
    if chars == 0:
        raise Gpt2LabError(f"the corpus {corpus} holds no text to train on")
    tok.add_special_tokens(list(RESERVED))  # after the BPE tokens: ids n, n+1, ... as in GPT-2's layout
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_JSON))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    meta = {
        "format": "gpt2lab-tokenizer",
        "format_version": 1,
        "name": name or out.resolve().name,
        "vocab_size": vocab,
        "padded_vocab_size": padded(vocab),
        "eot": tok.token_to_id(EOT_TOKEN),
        "special_tokens": {t: tok.token_to_id(t) for t in RESERVED},
        "config": asdict(cfg),
        "pattern_regex": PATTERNS[cfg.pattern],
        "corpus": corpus,
        "chars": chars,
        "seconds": round(seconds, 2),
        "library": f"tokenizers {tokenizers_version}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / TOKENIZER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def train_command(args: argparse.Namespace) -> int:
    """`gpt2lab tokenizer train CORPUS... --vocab-size N --out DIR`."""
    cfg = BpeConfig(args.vocab_size, args.pattern, args.min_frequency, args.max_chars)
    cfg.validate()
    if (Path(args.out) / TOKENIZER_JSON).exists() and not args.force:
        raise Gpt2LabError(f"{args.out} already holds a {TOKENIZER_JSON}; choose another --out (or --force)")
    texts = documents(args.corpus, held_out=False, mirror=args.mirror)
    meta = train_bpe(texts, cfg, args.out, args.name, " ".join(args.corpus))
    short = TrainedTokenizer(args.out).hash[:12]
    print(
        f"wrote {Path(args.out) / TOKENIZER_JSON} ({meta['name']}, sha256 {short}): {meta['vocab_size']:,} tokens "
        f"(model rows {meta['padded_vocab_size']:,}), <|endoftext|> = {meta['eot']}, pattern {cfg.pattern}; "
        f"trained on {meta['chars']:,} characters in {meta['seconds']:.1f} s"
    )
    return 0


# ----------------------------------------------------------------------------- comparing


def measure(tok, texts: list[str]) -> dict:
    """Bytes per token, tokens per document and encode speed (batch, and one text at a time) of a tokenizer."""
    nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    t0 = time.perf_counter()
    batch = tok.encode_ordinary_batch(texts)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [tok.encode_ordinary(t) for t in texts]
    t_single = time.perf_counter() - t0
    if single != batch:
        raise AssertionError(f"{tok.name}: batch and single encodings differ")  # a bug, not a user error
    tokens = sum(len(ids) for ids in batch)
    return {
        "name": tok.name,
        "vocab_size": tok.vocab_size,
        "tokens": tokens,
        "bytes": nbytes,
        "bytes_per_token": nbytes / max(tokens, 1),
        "tokens_per_doc": tokens / max(len(texts), 1),
        "mb_per_s_batch": nbytes / 1e6 / max(t_batch, 1e-9),
        "mb_per_s_single": nbytes / 1e6 / max(t_single, 1e-9),
    }


def format_comparison(rows: list[dict], where: str, docs: int) -> str:
    """The comparison as a Markdown table; the first tokenizer is the baseline of the 'tokens' ratio."""
    head = "| tokenizer | vocab | tokens | bytes/token | tokens/doc | tokens vs first | MB/s batch | MB/s single |"
    lines = [f"Held-out text: {where} ({docs:,} documents, {rows[0]['bytes']:,} bytes)", "", head]
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['vocab_size']:,} | {r['tokens']:,} | {r['bytes_per_token']:.3f} | "
            f"{r['tokens_per_doc']:,.1f} | {r['tokens'] / rows[0]['tokens']:.3f} | {r['mb_per_s_batch']:.2f} | "
            f"{r['mb_per_s_single']:.2f} |"
        )
    return "\n".join(lines)


def compare_command(args: argparse.Namespace) -> int:
    """`gpt2lab tokenizer compare TOK... --on CORPUS`: one table row per tokenizer."""
    toks = [load_tokenizer(spec, args.mirror) for spec in args.tokenizers]
    texts = list(take_chars(documents(args.on, held_out=True, mirror=args.mirror), args.max_chars))
    if not texts:
        raise Gpt2LabError(f"{' '.join(args.on)} gave no held-out text to compare on")
    rows = [measure(tok, texts) for tok in toks]
    where = " ".join(args.on) + (" (val split)" if args.on[0] in ("gutenberg", "shakespeare") else "")
    print(format_comparison(rows, where, len(texts)))
    if args.json:
        Path(args.json).write_text(json.dumps({"on": args.on, "documents": len(texts), "rows": rows}, indent=2) + "\n")
    return 0
