"""`gpt2lab train`: build the run's config (a preset, or the one saved in a run to resume) and train.

The CLI glue between ``gpt2lab.config`` and ``gpt2lab.train.loop``, kept out of both so that imports
flow one way: launch -> config -> train (train never imports config).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.config import Config, build_config, load_config
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop.load import is_run_folder, no_checkpoint_yet
from gpt2lab.train.loop import train


def resolve_run(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config and run folder of `gpt2lab train [CONFIG] [--set k=v ...] [--run-dir DIR] [--resume RUN_DIR]`."""
    if args.resume and args.run_dir:
        raise Gpt2LabError("--resume RUN_DIR continues in RUN_DIR; leave out --run-dir")
    if args.resume:
        latest = ckpt.find_latest(args.resume)
        if latest is None:
            if is_run_folder(Path(args.resume)):
                raise Gpt2LabError(no_checkpoint_yet(Path(args.resume)))
            raise Gpt2LabError(f"{args.resume}: no complete checkpoint to resume from (is it a run folder?)")
        if args.config:
            return load_config(args.config, args.set), Path(args.resume)
        saved = ckpt.read_json(latest / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY, {}).get("config")
        if not isinstance(saved, dict):
            raise Gpt2LabError(f"{latest}: no training config inside; give the CONFIG file too")
        return build_config(saved, f"{latest / ckpt.CONFIG_NAME}", args.set), Path(args.resume)
    if args.config:
        return load_config(args.config, args.set), Path(args.run_dir or Path("runs") / Path(args.config).stem)
    raise Gpt2LabError("give a CONFIG file (e.g. configs/shakespeare.toml) or --resume RUN_DIR")


def train_command(args: argparse.Namespace) -> int:
    """`gpt2lab train ...`: train (or resume) the run the arguments name."""
    cfg, run_dir = resolve_run(args)
    train(cfg, run_dir, resume=bool(args.resume))
    return 0
