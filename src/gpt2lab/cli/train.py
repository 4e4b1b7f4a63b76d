"""Subcommands `gpt2lab train`, `plot` and `ablate`: the training run, its curves, and variants compared.

Each handler imports its module lazily, so building the parser stays light.
"""

from __future__ import annotations

import argparse


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a GPT from a TOML config (works under torchrun too)")
    p.add_argument("config", nargs="?", help="a TOML preset, e.g. configs/shakespeare.toml (optional with --resume)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from gpt2lab.train.command import train_command

    return train_command(args)


def add_plot(sub) -> None:
    p = sub.add_parser(
        "plot", help="draw a run's loss, HellaSwag, learning rate and throughput to a PNG; several runs: compare them"
    )
    p.add_argument("run_dir", nargs="+", help="run folders holding metrics.jsonl; the first sets the target loss")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png; several runs: compare.png)")
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from gpt2lab.report.plot import plot_command

    return plot_command(args)


def add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="train a base config and variants of it, then compare them (tokens to target)")
    p.add_argument("config", help="the base TOML preset, e.g. configs/shakespeare.toml (the first row, 'base')")
    p.add_argument(
        "--variant", action="append", default=[], metavar="NAME:SECTION.KEY=VALUE[,...]",
        help="a variant of the base, e.g. relu2:model.mlp=relu2,model.qk_norm=true (repeat for more)",
    )  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every run")
    p.add_argument("--runs-dir", default=None, help="folder of the runs, one per variant (default: runs/ablate-NAME)")
    p.add_argument("--out", default=None, help="PNG path of the comparison (default: RUNS_DIR/compare.png)")
    p.set_defaults(func=run_ablate)


def run_ablate(args: argparse.Namespace) -> int:
    from gpt2lab.train.ablate import ablate_command

    return ablate_command(args)
