"""`gpt2lab train`: build the run's config (a preset, or the one saved in a run to resume) and train.

The CLI glue between ``gpt2lab.config`` and ``gpt2lab.train.loop``, kept out of both so that imports
flow one way: this command -> config -> the loop (the loop never imports config). It also gives the loop what a run
trains for (``objective``: pretraining, or the SFT or RL stage its config names, so ``--resume`` continues any
run) and what it measures along the way (``evaluations``: HellaSwag), so the loop imports no stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.config import Config, build_config, load_config
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop.load import is_run_folder, no_checkpoint_yet
from gpt2lab.train.loop import train
from gpt2lab.train.objective import Evaluation, NextToken, Objective
from gpt2lab.train.run import Run


def objective(cfg: Config) -> Objective:
    """What the run trains for: SFT when sft.data is set, RL when rl.task is, else pretraining on shards."""
    sft, rl = getattr(cfg, "sft", None), getattr(cfg, "rl", None)
    if sft is not None and sft.data:  # conversations packed into rows, targets -1 outside the assistant's tokens
        from gpt2lab.sft.objective import SFTObjective

        return SFTObjective(sft)
    if rl is not None and rl.task:  # on-policy rollouts of the model being trained, rewarded by the task's verifier
        from gpt2lab.rl.objective import RLObjective

        return RLObjective(rl)
    return NextToken()


def evaluations(cfg: Config) -> list[Evaluation]:
    """The measurements during training: HellaSwag every eval.hellaswag_every steps."""
    if not cfg.eval.hellaswag_every:
        return []
    from gpt2lab.eval import hellaswag
    from gpt2lab.interop import tokenizer_match

    examples: list = []  # loaded at the first evaluation

    def measure(run: Run) -> float:
        """HellaSwag acc_norm of the raw model through the evaluation package, every rank its share."""
        if not examples:
            examples.extend(hellaswag.load_examples(hellaswag.locate(), run.cfg.eval.hellaswag_limit or None))
        result = hellaswag.evaluate_hellaswag(
            run.raw_model, tokenizer_match.run_tokenizer(run.cfg, run.resumed_from), examples, run.info.device,
            batch_size=max(1, run.cfg.train.micro_batch // 4), rank=run.info.rank, world_size=run.info.world_size,
        )  # fmt: skip
        run.raw_model.train()
        return float(result["acc_norm"])

    return [Evaluation("hellaswag", cfg.eval.hellaswag_every, measure, check=hellaswag.locate)]


def train_stage(cfg: Config, run_dir: Path, resume: bool = False) -> Path | None:
    """Train (or resume) the run of cfg, with the objective and evaluations its config names."""
    if cfg.rl.task and cfg.rl.verifier:  # what a resume may import again (gpt2lab.rl.tasks.check_resumed_verifier)
        from gpt2lab.rl.tasks import record_verifier

        record_verifier(cfg.rl.verifier)
    return train(cfg, run_dir, resume=resume, objective=objective(cfg), evaluations=evaluations(cfg))


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
        cfg = build_config(saved, f"{latest / ckpt.CONFIG_NAME}", args.set)
        if cfg.rl.task and cfg.rl.verifier:  # the saved config's verifier is code: imported only if trusted
            from gpt2lab.rl.tasks import check_resumed_verifier

            named = any(s.startswith("rl.verifier=") for s in args.set)
            check_resumed_verifier(cfg.rl.verifier, named, str(latest / ckpt.CONFIG_NAME))
        return cfg, Path(args.resume)
    if args.config:
        return load_config(args.config, args.set), Path(args.run_dir or Path("runs") / Path(args.config).stem)
    raise Gpt2LabError("give a CONFIG file (e.g. configs/shakespeare.toml) or --resume RUN_DIR")


def train_command(args: argparse.Namespace) -> int:
    """`gpt2lab train ...`: train (or resume) the run the arguments name."""
    cfg, run_dir = resolve_run(args)
    train_stage(cfg, run_dir, resume=bool(args.resume))
    return 0
