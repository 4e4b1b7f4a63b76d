"""`gpt2lab sft`: fine-tune a model on conversations through the one training loop (``gpt2lab.train.loop``).

The CLI glue, like ``gpt2lab.train.command``: it builds a Config whose [model] is the base model's (with the chat
vocabulary, ``gpt2lab.chat.base``), whose [sft] names the data, and whose [optim] schedule is [sft]'s; then
``train.train`` runs it with SFT's objective (``gpt2lab.sft.objective``: batches from ``gpt2lab.sft.data``, the
loss masked to the assistant's tokens); checkpoints, resume, metrics, DDP and the progress line are the loop's own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2lab.chat.base import base_model_config, base_tokenizer, chat_model_config, sft_vocab
from gpt2lab.config import (
    Config,
    Replaced,
    build_config,
    parse_sets,
    refuse_replaced_optim,
    tuning_schedule,
    tuning_values,
    validate,
)
from gpt2lab.errors import Gpt2LabError
from gpt2lab.sft.objective import SFTObjective
from gpt2lab.train.command import evaluations
from gpt2lab.train.loop import train

# An SFT run's defaults where the config and --set say nothing: short, checkpointed, validated often.
SFT_DEFAULTS = {
    "train": {"max_steps": 300, "micro_batch": 8, "save_every": 100, "keep_checkpoints": 2},
    "eval": {"val_every": 50, "val_batches": 8, "sample_every": 0, "hellaswag_every": 0},
    "log": {"every": 10},
}
# the [optim] keys that [sft]'s schedule (config.tuning_schedule) replaces, and the keys that set them here
SFT_REPLACES: Replaced = {
    "lr": ("sft.lr", None),
    "min_lr_ratio": ("sft.min_lr_ratio", None),
    "weight_decay": ("sft.weight_decay", None),
    "warmup_steps": ("sft.warmup_fraction", "a share of train.max_steps"),
    "decay_steps": (None, "its cosine ends at train.max_steps, the run's last step"),
}


def sft_config(args: argparse.Namespace) -> Config:
    """The Config of `gpt2lab sft [CONFIG] --model M --data PATH[:W] ... [--set k=v ...]`."""
    flags = {"model": args.model, "data": ",".join(args.data), "thinking": getattr(args, "thinking", False)}
    values, source = tuning_values(args.config, "sft", flags, SFT_DEFAULTS, "an SFT", "the model it fine-tunes")
    sets, sft = parse_sets(args.set), values["sft"]
    refuse_replaced_optim(values, sets, source, "sft", SFT_REPLACES)
    model_spec, data = sets.get("sft.model", sft.get("model")), sets.get("sft.data", sft.get("data"))
    if not model_spec or not data:
        raise Gpt2LabError("gpt2lab sft needs --model (the model to fine-tune) and --data (conversations)")
    model = chat_model_config(base_model_config(model_spec), sft_vocab(base_tokenizer(model_spec)))
    values["model"] = model.to_dict()
    train_values = values["train"]
    if "total_batch" not in train_values and "train.total_batch" not in sets:  # one micro-batch per step
        micro = sets.get("train.micro_batch", train_values["micro_batch"])
        if str(micro).isdigit():  # "auto": the user sets train.total_batch
            train_values["total_batch"] = int(micro) * model.block_size
    cfg = build_config(values, source, args.set)
    s = cfg.sft  # the SFT schedule: [sft]'s lr, warmup share and floor replace [optim]'s
    tuning_schedule(cfg, s.lr, s.warmup_fraction, s.min_lr_ratio, s.weight_decay)
    validate(cfg, source)
    return cfg


def sft_command(args: argparse.Namespace) -> int:
    """`gpt2lab sft ...`: fine-tune, then say how to chat with the result."""
    cfg = sft_config(args)
    run_dir = Path(args.run_dir or Path("runs") / "chat")
    train(cfg, run_dir, objective=SFTObjective(cfg.sft), evaluations=evaluations(cfg))
    print(f"chat with it: gpt2lab chat --model {run_dir}")
    return 0
