"""`gpt2lab rl`: reinforcement learning with verifiable rewards through the one training loop.

The CLI glue, like ``gpt2lab.sft.command``: it builds a Config whose [model] is the policy's (a chat model),
whose [rl] names the task, and whose [optim] schedule is [rl]'s; ``train.train`` runs it, with RL's
objective (``gpt2lab.rl.objective``: rollouts from ``gpt2lab.rl.rollout.RolloutLoader``, the policy-gradient loss).
One optimizer step takes rl.prompts_per_step prompts x rl.group_size completions, in micro-batches of
train.micro_batch rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
from gpt2lab.rl.objective import RLObjective
from gpt2lab.rl.tasks import record_verifier
from gpt2lab.train.command import evaluations
from gpt2lab.train.loop import train

# An RL run's defaults where the config and --set say nothing: every step logged, checkpointed often.
RL_DEFAULTS = {
    "train": {"max_steps": 200, "micro_batch": 8, "save_every": 50, "keep_checkpoints": 2},
    "eval": {"val_every": 0, "sample_every": 0, "hellaswag_every": 0},
    "log": {"every": 1},
}
# the [optim] keys that [rl]'s schedule (config.tuning_schedule) replaces, and the keys that set them here
RL_REPLACES: Replaced = {
    "lr": ("rl.lr", None),
    "weight_decay": ("rl.weight_decay", None),
    "warmup_steps": ("rl.warmup_fraction", "a share of train.max_steps"),
    "min_lr_ratio": (None, "its lr is constant after warmup"),
    "decay_steps": (None, "its lr is constant after warmup"),
}


def rl_config(args: argparse.Namespace) -> Config:
    """The Config of `gpt2lab rl [CONFIG] --model M --task T [--set k=v ...]`."""
    from gpt2lab.chat.base import base_model_config, is_chat_model

    flags = {"model": args.model, "task": args.task}
    values, source = tuning_values(args.config, "rl", flags, RL_DEFAULTS, "an RL", "the policy it trains")
    sets, rl = parse_sets(args.set), values["rl"]
    refuse_replaced_optim(values, sets, source, "rl", RL_REPLACES)
    model_spec, task = sets.get("rl.model", rl.get("model")), sets.get("rl.task", rl.get("task"))
    if not model_spec or not task:
        raise Gpt2LabError("gpt2lab rl needs --model (a chat model, e.g. from gpt2lab sft) and --task")
    if not is_chat_model(model_spec):
        raise Gpt2LabError(
            f"{model_spec} is a base model: gpt2lab rl trains a chat model (fine-tune it first with gpt2lab sft)"
        )
    model = base_model_config(model_spec)
    values["model"] = model.to_dict()
    micro = str(sets.get("train.micro_batch", values["train"]["micro_batch"]))
    if not micro.isdigit():
        raise Gpt2LabError(f"{source}: an RL run needs a number of rows for train.micro_batch (got {micro})")
    values["train"]["total_batch"] = int(micro) * model.block_size  # replaced below, once [rl] is read
    cfg = build_config(values, source, [s for s in args.set if not s.startswith("train.total_batch")])
    r = cfg.rl
    # one step = prompts x group completions; the loop's grad accumulation = those rows / (micro-batch x ranks)
    cfg.train.total_batch = r.prompts_per_step * r.group_size * cfg.model.block_size
    tuning_schedule(cfg, r.lr, r.warmup_fraction, 1.0, r.weight_decay)  # min_lr_ratio 1: constant after warmup
    validate(cfg, source)
    return cfg


def rl_command(args: argparse.Namespace) -> int:
    """`gpt2lab rl ...`: train the policy, then say how to evaluate it."""
    cfg = rl_config(args)
    run_dir = Path(args.run_dir or Path("runs") / "rl")
    record_verifier(cfg.rl.verifier)  # a resume imports this verifier again only while its file is unchanged
    train(cfg, run_dir, objective=RLObjective(cfg.rl), evaluations=evaluations(cfg))
    if cfg.rl.task in ("gsm8k", "arith"):
        print(f"evaluate it: gpt2lab eval {cfg.rl.task} --model {run_dir}")
    return 0
