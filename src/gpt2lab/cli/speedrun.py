"""Subcommand `gpt2lab speedrun`: the whole process, tokenizer to chatbot, in one command with a report card.

The handler imports the speedrun lazily, so building the parser stays light.
"""

from __future__ import annotations

import argparse

DEFAULT_PLAN = "configs/speedrun/cpu.toml"


def add_speedrun(sub) -> None:
    p = sub.add_parser(
        "speedrun",
        help="run every stage (tokenizer, data, pretraining, evaluation, SFT, RL, chat) and write REPORT.md",
        description="Run the whole process as gpt2lab commands, one stage after another, and write a report card "
        "(OUT/REPORT.md: each stage's command, wall time and figures, samples and curves). Run again, it goes on "
        "where it stopped. Plans: configs/speedrun/cpu.toml (about 20 minutes on 2 cores), gpu.toml (GPT-2 124M "
        "on FineWeb-Edu), toy.toml (a minute, to try it).",
    )  # fmt: skip
    p.add_argument("plan", nargs="?", default=DEFAULT_PLAN, help="a plan: configs/speedrun/{cpu,gpu,toy}.toml")
    p.add_argument("--out", default="runs/speedrun", help="the folder every stage writes into")
    p.add_argument("--fresh", action="store_true", help="delete --out first and start over")
    p.add_argument("--dry-run", action="store_true", help="print the stages' commands and stop")
    p.set_defaults(func=run_speedrun)


def run_speedrun(args: argparse.Namespace) -> int:
    from gpt2lab.speedrun.run import speedrun_command

    return speedrun_command(args)
