"""Command line: argument parsing and dispatch only; the work is done in the modules.

Each subcommand is a parser-builder plus a handler that imports its module lazily (so
``gpt2lab --help`` stays fast) and calls one function. A ``Gpt2LabError`` anywhere becomes
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from gpt2lab.errors import Gpt2LabError

# ----------------------------------------------------------------------------- sample / export


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a model, streaming tokens as they come")
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hugging Face folder, or a checkpoint")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokenizer", default=None, help="folder with encoder.json and vocab.bpe")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from gpt2lab.generate import sample_command

    return sample_command(args)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 folder")
    p.add_argument("checkpoint", help="a gpt2lab checkpoint or run folder (or any --model spec)")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer", default=None, help="folder with encoder.json and vocab.bpe to copy")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from gpt2lab.hf import export_command

    return export_command(args)


# ----------------------------------------------------------------------------- data (issue: data)


def add_data(sub) -> None:
    pass  # TODO(data helper): `gpt2lab data prepare SOURCE ...` and `gpt2lab data info DIR`


# ----------------------------------------------------------------------------- train / plot (issue: training)


def add_train(sub) -> None:
    pass  # TODO(train helper): `gpt2lab train CONFIG [--set k=v] [--resume RUN_DIR]`


def add_plot(sub) -> None:
    pass  # TODO(train helper): `gpt2lab plot RUN_DIR`


# ----------------------------------------------------------------------------- eval (issue: evaluation)


def add_eval(sub) -> None:
    pass  # TODO(eval helper): `gpt2lab eval {hellaswag,loss,wikitext2,lambada,all} --model ...`


# ----------------------------------------------------------------------------- bench


def add_bench_sample(bsub) -> None:
    pass  # TODO(foundation helper): `gpt2lab bench sample`


def add_bench_data(bsub) -> None:
    pass  # TODO(data helper): `gpt2lab bench data`


def add_bench_train(bsub) -> None:
    pass  # TODO(train helper): `gpt2lab bench train`


def add_bench_eval(bsub) -> None:
    pass  # TODO(eval helper): `gpt2lab bench eval`


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: speed of sampling, data, training, evaluation")
    bsub = p.add_subparsers(dest="bench", required=True)
    for add in (add_bench_sample, add_bench_data, add_bench_train, add_bench_eval):
        add(bsub)


# ----------------------------------------------------------------------------- main

SUBCOMMANDS = [add_sample, add_export, add_data, add_train, add_plot, add_eval, add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2lab", description="Reproduce GPT-2 from scratch, then go past it.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except Gpt2LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
