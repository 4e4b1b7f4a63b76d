"""Subcommands `gpt2lab sft` and `gpt2lab rl`: a model fine-tuned on conversations, then trained on rewards.

Each handler imports its stage lazily, so building the parser stays light.
"""

from __future__ import annotations

import argparse


def add_sft(sub) -> None:
    p = sub.add_parser("sft", help="fine-tune a model on conversations into a chat model (the training loop's SFT)")
    p.add_argument("config", nargs="?", default=None, help="optional TOML with an [sft] section (and [train], ...)")
    p.add_argument("--model", default=None, help="the model to fine-tune: run folder, checkpoint, HF folder or name")
    p.add_argument("--data", action="append", default=[], help="conversations PATH or PATH:WEIGHT (repeatable)")
    p.add_argument("--run-dir", default=None, help="where the run is written (default: runs/chat)")
    p.add_argument("--thinking", action="store_true", help="GSM8K: the solution as a thinking span (sft.thinking)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.set_defaults(func=run_sft)


def run_sft(args: argparse.Namespace) -> int:
    from gpt2lab.sft.command import sft_command

    return sft_command(args)


def add_rl(sub) -> None:
    p = sub.add_parser("rl", help="train a chat model with rewards from a verifier (GRPO, the training loop's RL)")
    p.add_argument("config", nargs="?", default=None, help="optional TOML with an [rl] section (and [train], ...)")
    p.add_argument("--model", default=None, help="the policy: a chat model (a gpt2lab sft run, checkpoint, export)")
    p.add_argument("--task", default=None, help="gsm8k, arith, or a JSONL of prompts and answers")
    p.add_argument("--run-dir", default=None, help="where the run is written (default: runs/rl)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.set_defaults(func=run_rl)


def run_rl(args: argparse.Namespace) -> int:
    from gpt2lab.rl.command import rl_command

    return rl_command(args)
