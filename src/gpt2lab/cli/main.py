"""Command line: argument parsing and dispatch only; the work is done in the modules.

Each subcommand is a parser-builder plus a handler that imports its module lazily (so
``gpt2lab --help`` stays fast) and calls one function; they live in this package's modules, one
per part of the process (data, train, eval, bench, tuning, inference, speedrun). A ``Gpt2LabError`` anywhere
becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from gpt2lab import __version__
from gpt2lab.cli.bench import add_bench
from gpt2lab.cli.data import add_data, add_tokenizer
from gpt2lab.cli.eval import add_eval
from gpt2lab.cli.inference import add_chat, add_consolidate, add_export, add_sample, add_serve
from gpt2lab.cli.speedrun import add_speedrun
from gpt2lab.cli.train import add_ablate, add_plot, add_train
from gpt2lab.cli.tuning import add_rl, add_sft
from gpt2lab.errors import Gpt2LabError

SUBCOMMANDS = [
    add_sample, add_export, add_consolidate, add_data, add_tokenizer, add_train, add_plot, add_ablate, add_eval,
    add_bench, add_sft, add_chat, add_serve, add_rl, add_speedrun,
]  # fmt: skip


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in --help, except where there is none to show or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        nothing = action.default is None or action.default is False or action.default in ("", [])
        if nothing or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subparsers (built with the parser's own class) all show defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpt2lab", description="Reproduce GPT-2 from scratch, then go past it.")
    parser.add_argument("--version", action="version", version=f"gpt2lab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # under torchrun every rank meets the same error: rank 0 alone says so (all exit with the code)
    speak = int(os.environ.get("RANK", "0")) == 0
    try:
        return args.func(args) or 0
    except Gpt2LabError as e:
        if speak:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if speak:
            print("interrupted", file=sys.stderr)
        return 130
