"""Subcommands `gpt2lab data` (prepare, info, index, arith) and `gpt2lab tokenizer` (train, compare).

Each handler imports its module lazily, so building the parser stays light.
"""

from __future__ import annotations

import argparse

# ----------------------------------------------------------------------------- data (issue: data)


def add_data(sub) -> None:
    from gpt2lab.rl.arith import ARITH_DIGITS  # a light module (no torch): one default for data, eval and rl

    p = sub.add_parser("data", help="tokenize a text source into shards; describe a prepared dataset")
    dsub = p.add_subparsers(dest="data", required=True)
    prep = dsub.add_parser("prepare", help="tokenize a source into llm.c-format shards plus manifest.json")
    prep.add_argument("source", choices=["shakespeare", "fineweb-edu", "files", "gutenberg"], help="what to tokenize")
    prep.add_argument("paths", nargs="*", help="files: glob patterns ('corpus/*.jsonl'); gutenberg: a folder of books")
    prep.add_argument("--out", default=None, help="dataset folder to write (default: data/SOURCE)")
    prep.add_argument("--mirror", default=None, help="offline data folder laid out like ../shared/data")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    prep.add_argument("--tokenizer", default="gpt2", help="gpt2, or a folder holding tokenizer.json (tokenizer train)")
    prep.add_argument("--shard-size", type=int, default=None, help="tokens per shard (fineweb-edu 100M, else 10M)")
    prep.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    prep.add_argument(
        "--val-tokens", type=int, default=None,
        help="val size in tokens, whole documents (default: files min(1M, ~10%%), fineweb-edu one shard)",
    )  # fmt: skip
    prep.add_argument("--text-field", default="text", help=".jsonl/.parquet field holding the text")
    prep.add_argument("--blank-line-docs", action="store_true", help=".txt: a document per blank-line block")
    prep.add_argument("--val-books", type=int, default=4, help="gutenberg: books held out as val")
    prep.set_defaults(func=run_data_prepare)
    info = dsub.add_parser("info", help="print a prepared dataset's manifest summary and check its shards")
    info.add_argument("dir", help="a dataset folder (holds manifest.json)")
    info.add_argument("--verify", action="store_true", help="also check sha256 checksums and token ids")
    info.set_defaults(func=run_data_info)
    index = dsub.add_parser("index", help="write manifest.json for a folder of llm.c shards")
    index.add_argument("dir", help="a folder of llm.c .bin shards (NAME_train_000001.bin, NAME_val_000000.bin...)")
    index.set_defaults(func=run_data_index)
    arith = dsub.add_parser("arith", help="write synthetic arithmetic conversations (JSONL) for gpt2lab sft")
    arith.add_argument("--out", required=True, help="the JSONL file to write")
    arith.add_argument("--n", type=int, default=5000, help="conversations (train-split problems)")
    arith.add_argument("--digits", type=int, default=ARITH_DIGITS, help="digits per operand")
    arith.add_argument("--ops", default="+", help="operations drawn from: +, * or +*")
    arith.add_argument(
        "--thinking", nargs="?", type=float, const=1.0, default=0.0, metavar="SHARE",
        help="the worked solution as the reply's thinking span (in a SHARE of them, e.g. 0.25; alone: all)",
    )  # fmt: skip
    arith.add_argument(
        "--tool", action="store_true",
        help="answer through the calculator, <<347*286=99242>>99242 (fine-tune with --set sft.calculator=tool)",
    )  # fmt: skip
    arith.set_defaults(func=run_data_arith)


def run_data_arith(args: argparse.Namespace) -> int:
    from gpt2lab.rl.arith import write_arith_conversations

    return write_arith_conversations(args.out, args.n, args.digits, args.ops, args.thinking, args.tool)


def run_data_prepare(args: argparse.Namespace) -> int:
    from gpt2lab.data.prepare import prepare_command

    return prepare_command(args)


def run_data_info(args: argparse.Namespace) -> int:
    from gpt2lab.data.info import info_command

    return info_command(args)


def run_data_index(args: argparse.Namespace) -> int:
    from gpt2lab.data.info import index_command

    return index_command(args)


# ----------------------------------------------------------------------------- tokenizer (issue 15)


def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train your own byte-level BPE tokenizer; compare tokenizers")
    tsub = p.add_subparsers(dest="tokenizer", required=True)
    tr = tsub.add_parser("train", help="train a byte-level BPE (Hugging Face tokenizers) on a corpus")
    tr.add_argument("corpus", nargs="+", help="a source (shakespeare, gutenberg [DIR], ...) or globs ('corpus/*.txt')")
    tr.add_argument("--out", required=True, help="folder to write tokenizer.json and gpt2lab_tokenizer.json into")
    tr.add_argument("--vocab-size", type=int, default=16384, help="all tokens, the 13 special ones included")
    tr.add_argument("--pattern", default="gpt4", choices=["gpt2", "gpt4"], help="pre-tokenisation split regex")
    tr.add_argument("--max-chars", type=int, default=None, help="train on the corpus's first N characters")
    tr.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are never merged")
    tr.add_argument("--name", default=None, help="the name shards and runs record (default: the --out folder's)")
    tr.add_argument("--mirror", default=None, help="offline data folder laid out like ../shared/data")
    tr.add_argument("--force", action="store_true", help="overwrite a tokenizer already in --out")
    tr.set_defaults(func=run_tokenizer_train)
    cmp = tsub.add_parser("compare", help="bytes per token, tokens per document and speed on held-out text")
    cmp.add_argument("tokenizers", nargs="+", help="gpt2, or folders holding tokenizer.json")
    cmp.add_argument(
        "--on", nargs="+", required=True, metavar="CORPUS",
        help="a source (its val split: gutenberg's held-out books, shakespeare's last 10%%), wikitext2 (the mirror's "
        "test file, by article) or file globs",
    )  # fmt: skip
    cmp.add_argument("--max-chars", type=int, default=None, help="compare on the first N held-out characters")
    cmp.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    cmp.add_argument("--mirror", default=None, help="offline data folder laid out like ../shared/data")
    cmp.set_defaults(func=run_tokenizer_compare)


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from gpt2lab.tokenizer.train import train_command

    return train_command(args)


def run_tokenizer_compare(args: argparse.Namespace) -> int:
    from gpt2lab.tokenizer.train import compare_command

    return compare_command(args)
