"""A training run's set-up and checkpoints: what ``gpt2lab.train.loop`` needs besides the config (``Run``), built
by ``setup`` (the model, optimizer, the objective's loaders; restored on a resume) and saved by ``save``."""

from __future__ import annotations

import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop import tokenizer_match
from gpt2lab.model.gpt import GPT
from gpt2lab.runtime import hardware
from gpt2lab.runtime.dist import DistInfo
from gpt2lab.train import dcp as dcp_checkpoint
from gpt2lab.train import fsdp
from gpt2lab.train.objective import Evaluation, NextToken, Objective
from gpt2lab.train.optim import make_optimizer
from gpt2lab.train.perf import prepare_model, step_context

if TYPE_CHECKING:
    from gpt2lab.train.loop import RunConfig

NEXT_TOKEN = Objective()  # the default loss: next-token, of every target (pretraining's loaders: NextToken)


def precision(dtype: str, device: str) -> torch.dtype:
    """The autocast dtype for train.dtype on this device (runtime/hardware.py decides "auto"); TF32 where it exists."""
    caps = hardware.capabilities(device)
    if caps.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any matmul left in float32
        torch.backends.cudnn.allow_tf32 = True
    return hardware.autocast_dtype(dtype, caps)


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-steps per optimizer step; an error when total_batch does not divide."""
    per_step = cfg.train.micro_batch * cfg.model.block_size * world_size
    if cfg.train.total_batch % per_step:
        raise Gpt2LabError(
            f"train.total_batch ({cfg.train.total_batch}) is not divisible by train.micro_batch x model.block_size x "
            f"world size ({cfg.train.micro_batch} x {cfg.model.block_size} x {world_size} = {per_step})"
        )
    return cfg.train.total_batch // per_step


def git_commit() -> str | None:
    """The code version this run used, when the package lives in a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """What the loop needs besides the config: the models, the optimizer, the loaders."""

    cfg: RunConfig
    run_dir: Path
    info: DistInfo
    raw_model: GPT  # the one handle saved, evaluated and sampled from
    model: torch.nn.Module  # raw_model, compiled and/or DDP-wrapped: what the step runs
    optimizer: torch.optim.Optimizer
    loader: object
    val_loader: object | None
    grad_accum: int
    autocast: object
    start_step: int
    objective: Objective = NEXT_TOKEN  # what the step computes (its loaders are loader and val_loader)
    evaluations: tuple[Evaluation, ...] = ()  # measured every so many steps (HellaSwag)
    scaler: torch.amp.GradScaler | None = None  # float16 only: the loss scale, saved with each checkpoint
    skipped_steps: int = 0  # float16 steps the scaler skipped (an overflowed gradient), over the whole run
    resumed_from: Path | None = None  # the checkpoint resumed: an SFT run's tokenizer is read there, not in its base


def setup(
    cfg: RunConfig,
    run_dir: Path,
    info: DistInfo,
    resume: bool,
    objective: Objective | None = None,
    evaluations: tuple[Evaluation, ...] = (),
) -> Run:
    """Check everything that can fail early, then build the model, optimizer and the objective's loaders (and
    restore). ``objective``: what the run trains for (None: pretraining, the next-token loss over shards)."""
    objective = NextToken() if objective is None else objective
    grad_accum = grad_accum_steps(cfg, info.world_size)
    objective.check(cfg)
    for evaluation in evaluations:
        evaluation.check()
    latest = ckpt.find_latest(run_dir)
    if resume and latest is None:
        raise Gpt2LabError(f"{run_dir}: no complete checkpoint to resume from")
    if not resume and latest is not None:
        raise Gpt2LabError(
            f"{run_dir} already holds checkpoints; continue it with `gpt2lab train --resume {run_dir}`, "
            "or start afresh with --run-dir NEW_DIR"
        )
    caps = hardware.capabilities(info.device)
    dtype = precision(cfg.train.dtype, info.device)
    autocast = step_context(caps.device_type, dtype)
    scaler = torch.amp.GradScaler(caps.device_type) if hardware.needs_grad_scaler(dtype, caps) else None
    seed_everything(cfg.train.seed)
    sharded = cfg.train.parallel == "fsdp"  # FSDP2: built on meta, sharded, materialised (gpt2lab.train.fsdp)
    raw_model = fsdp.build_model(cfg, info, dtype) if sharded else GPT(cfg.model).to(info.device)
    if not resume:  # SFT and RL start from the weights of the model they fine-tune
        objective.init_weights(raw_model)
    optimizer = make_optimizer(raw_model, cfg.optim, info.device)
    objective.open(cfg, raw_model, info, latest if resume else None)
    loader, val_loader = objective.loader, objective.val_loader
    start_step, skipped = 0, 0
    if resume:
        start_step, skipped = restore(latest, raw_model, optimizer, loader, info, scaler)
    perf = fsdp.perf_without_compile(cfg.perf) if sharded else cfg.perf  # fsdp: compiled per block already
    model = prepare_model(raw_model, perf, info.device, dtype)  # compiled and/or fused loss, per [perf]
    if info.is_distributed and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[info.local_rank] if caps.device_type == "cuda" else None)
    return Run(
        cfg, run_dir, info, raw_model, model, optimizer, loader, val_loader, grad_accum, autocast, start_step,
        objective=objective, evaluations=tuple(evaluations), scaler=scaler, skipped_steps=skipped,
        resumed_from=latest if resume else None,
    )  # fmt: skip


def restore(
    folder: Path, raw_model: GPT, optimizer, loader, info: DistInfo, scaler: torch.amp.GradScaler | None = None
) -> tuple[int, int]:
    """Load a training checkpoint into the fresh model/optimizer/loader (and scaler); return (step, skipped steps)."""
    state, rng = dcp_checkpoint.load_training_checkpoint(folder, raw_model, optimizer)  # any format, any model
    loader.load_state_dict(state["loader"])
    if scaler is not None and state.get("grad_scaler"):  # float16: continue with the same loss scale
        scaler.load_state_dict(state["grad_scaler"])
    prefix = f"rank{info.rank}." if f"rank{info.rank}.torch" in rng else "rank0."
    plain = state["rng"][min(info.rank, len(state["rng"]) - 1)]
    ckpt.set_rng_state({k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}, plain)
    return int(state["step"]), int(state.get("skipped_steps", 0))


def _gather(obj: object, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def save(run: Run, step: int, metrics: dict) -> Path | None:
    """Every rank gives its RNG state; rank 0 writes the checkpoint (fsdp: all write shards) and gets its folder."""
    tensors, plain = ckpt.rng_state()
    gathered = _gather((tensors, plain), run.info.world_size)
    sharded = run.cfg.train.parallel == "fsdp"
    if not run.info.is_main and not sharded:
        return None
    state = {
        "step": step,
        "world_size": run.info.world_size,
        "loader": run.loader.state_dict(),  # the same on every rank
        "rng": [p for _, p in gathered],
        "metrics": metrics,
        "config": run.cfg.to_dict(),
        "grad_scaler": run.scaler.state_dict() if run.scaler is not None else None,  # plain floats and ints
        "skipped_steps": run.skipped_steps,
        "tokenizer": tokenizer_match.data_record(run.cfg, run.resumed_from),  # the shards' tokenizer (None: SFT, GPT-2)
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rng = {f"rank{r}.{k}": v for r, (t, _) in enumerate(gathered) for k, v in t.items()}
    try:
        if sharded:  # a collective: each rank writes its shards through DCP
            return dcp_checkpoint.save_training_checkpoint(
                run.run_dir, step, run.raw_model, run.optimizer, state, rng, run.cfg.train.keep_checkpoints,
                async_save=run.cfg.train.async_save,
            )  # fmt: skip
        return ckpt.save_training_checkpoint(
            run.run_dir, step, run.raw_model, run.optimizer, state, rng, run.cfg.train.keep_checkpoints
        )
    except OSError as e:
        prev = ckpt.find_latest(run.run_dir)
        raise Gpt2LabError(
            f"could not write the checkpoint of step {step} in {run.run_dir}/checkpoints: {e}; "
            f"the previous checkpoint ({prev or 'none'}) is intact"
        ) from None


def finished(folder: Path, cfg: RunConfig) -> bool:
    """True if the checkpoint ends a run of exactly this config (so running it again is a no-op)."""
    state = ckpt.read_json(folder / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY) or {}
    return state.get("config") == cfg.to_dict() and state.get("step", -1) >= cfg.train.max_steps


def saved_micro_batch(folder: Path) -> int | None:
    state = ckpt.read_json(folder / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY) or {}
    return (state.get("config") or {}).get("train", {}).get("micro_batch")


def agree_micro_batch(cfg: RunConfig, info: DistInfo) -> None:
    """Under DDP every rank must use the same micro-batch: the smallest that auto found (a divisor too)."""
    t = torch.tensor([cfg.train.micro_batch], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    cfg.train.micro_batch = int(t.item())
