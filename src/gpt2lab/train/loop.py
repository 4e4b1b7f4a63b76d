"""The training loop: one CPU, one GPU, or many through torchrun (DDP), with exact resume.

One optimizer step = ``grad_accum`` micro-batches of ``train.micro_batch`` x ``model.block_size``
tokens on each of ``world_size`` ranks, so that ``train.total_batch`` tokens enter every step;
``grad_accum`` is derived, never configured. Under DDP the gradients are all-reduced once per
step (``no_sync`` on the other micro-steps) and only rank 0 writes logs and checkpoints. On
CUDA: bf16 autocast (float16 with a gradient scaler on GPUs without bf16), TF32 matmuls and
``torch.compile``; on CPU: float32, eager. What the device can do is decided in ``gpt2lab.runtime.hardware``,
checked by its ``preflight`` before anything is built or written. The speed switches ([perf]: compile
mode, attention kernel, fused loss, recompute) live in ``gpt2lab.train.perf``. This module never imports
``gpt2lab.config`` (which composes the section dataclasses defined here): a run's config arrives as
an argument (``RunConfig``), and the CLI glue lives in ``gpt2lab.train.command``.

Departures from nanoGPT's train.py: the config is dataclasses + TOML (never ``exec``); the
loss and the grad norm are read to the host once per step, before ``optimizer.step()``, so a
NaN/inf never reaches the weights (under float16 an overflowed gradient is a skipped step, as
GradScaler intends; a non-finite loss stops the run); a SIGTERM/SIGINT finishes the current step and saves.
"""

from __future__ import annotations

import math
import random
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop import tokenizer_match
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.runtime import hardware
from gpt2lab.runtime.dist import DistInfo, destroy_distributed, init_distributed
from gpt2lab.train import dcp as dcp_checkpoint
from gpt2lab.train import fsdp
from gpt2lab.train.optim import OptimConfig, lr_at, make_optimizer, set_lr
from gpt2lab.train.perf import PerfConfig, prepare_model, step_context
from gpt2lab.train.reference import speed_note, val_loss_note
from gpt2lab.train.runlog import MetricsLog, StopSignals

DTYPES = hardware.DTYPES
MAX_SKIPPED_IN_A_ROW = 25  # float16: a loss scale halved this often cannot recover; stop instead of spinning

# Dense bf16 peak FLOP/s by GPU name (first substring match wins), for MFU. Omitted when unknown.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)


@dataclass
class TrainConfig:
    """The [train] section: batch, steps, precision, checkpoints."""

    max_steps: int = 19073  # optimizer steps to train for (19,073 x 2^19 tokens ~ 10B tokens)
    total_batch: int = 524288  # tokens per optimizer step over all ranks and micro-steps (2^19)
    micro_batch: int | None = 64  # sequences per forward/backward on each rank; auto = the largest that fits
    seed: int = 1337  # seed of the weight init (and of the python/numpy/torch RNGs)
    device: str = "auto"  # auto (cuda, mps, cpu: the best present), cpu, cuda, mps
    dtype: str = "auto"  # auto (bf16 on GPUs with it, else fp16 + scaler; CPU fp32), bfloat16, float16, float32
    save_every: int = 1000  # steps between checkpoints (0 = only at the end and on a signal)
    keep_checkpoints: int = 3  # newest checkpoints kept in RUN_DIR/checkpoints (0 = all)
    parallel: str = "ddp"  # ddp (each rank holds the whole model) | fsdp (FSDP2: weights, grads, optimizer sharded)
    reshard_after_forward: bool = True  # fsdp: free each block's gathered weights after forward (ZeRO-3)
    async_save: bool = False  # fsdp: write checkpoints in the background (dcp.async_save) while training goes on

    def validate(self, model: GPTConfig) -> list[str]:
        problems = []
        for name in ("max_steps", "total_batch", "micro_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if self.save_every < 0 or self.keep_checkpoints < 0:
            problems.append("train.save_every and train.keep_checkpoints must be >= 0")
        if self.parallel not in ("ddp", "fsdp"):
            problems.append(f"train.parallel must be ddp or fsdp (got {self.parallel!r})")
        if self.dtype not in ("auto", *DTYPES):
            problems.append(f"train.dtype must be auto, float32, bfloat16 or float16 (got {self.dtype!r})")
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            problems.append(f"train.device must be auto, cpu, cuda[:N] or mps (got {self.device!r})")
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append(f"train.device is {self.device!r} but no CUDA GPU is available")
        per_rank = (self.micro_batch or 1) * model.block_size  # auto: checked once the micro-batch is known
        if self.total_batch >= 1 and per_rank >= 1 and self.total_batch % per_rank:
            problems.append(
                f"train.total_batch ({self.total_batch}) is not divisible by train.micro_batch x model.block_size "
                f"({self.micro_batch} x {model.block_size} = {per_rank})"
            )
        return problems


@dataclass
class EvalConfig:
    """The [eval] section: what is measured during training, and how often (0 = never)."""

    val_every: int = 250  # steps between validation losses (also at step 0 and at the end)
    val_batches: int = 20  # micro-batches per rank in each validation pass
    sample_every: int = 0  # steps between printed samples (also at the end when > 0)
    sample_prompt: str = "Hello, I'm a language model,"  # prompt of those samples
    sample_count: int = 2  # samples each time
    sample_tokens: int = 48  # new tokens per sample
    hellaswag_every: int = 0  # steps between HellaSwag accuracies (needs gpt2lab.eval.hellaswag)
    hellaswag_limit: int = 0  # HellaSwag examples per evaluation (0 = all 10,042)

    def validate(self) -> list[str]:
        names = ("val_every", "val_batches", "sample_every", "sample_count", "sample_tokens", "hellaswag_every")
        return [f"eval.{n} must be >= 0 (got {getattr(self, n)})" for n in names if getattr(self, n) < 0]


@dataclass
class LogConfig:
    """The [log] section: where progress goes."""

    every: int = 1  # steps between progress lines and train metrics records
    tensorboard: bool = True  # also write TensorBoard events to RUN_DIR/tb

    def validate(self) -> list[str]:
        return [] if self.every >= 1 else [f"log.every must be >= 1 (got {self.every})"]


class RunConfig(Protocol):
    """What a run reads of its config (gpt2lab.config.Config composes these sections)."""

    model: GPTConfig
    data: object  # gpt2lab.data.loader.DataConfig
    optim: OptimConfig
    train: TrainConfig
    eval: EvalConfig
    log: LogConfig
    perf: PerfConfig
    reference: object  # gpt2lab.train.reference.ReferenceConfig

    def to_dict(self) -> dict[str, dict]: ...

    def to_toml(self) -> str: ...


# ----------------------------------------------------------------------------- one step


def forward_backward(
    model: torch.nn.Module, loader, grad_accum: int, autocast, ddp: bool, scaler: torch.amp.GradScaler | None = None
) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over grad_accum micro-batches; return that loss (0-dim).

    Each micro-loss is divided by grad_accum, so k micro-batches of B/k give the gradient of
    one batch of B. Under DDP only the last backward all-reduces (no_sync on the others). With a
    scaler (float16) the loss is scaled before each backward, so small gradients do not underflow.
    """
    total = None
    # SFT (a loader with masked_targets): the step's micro-batches are read first, so the loss can be averaged
    # over the trained tokens of the whole global batch, not micro-batch by micro-batch
    batches = [loader.next_batch() for _ in range(grad_accum)] if getattr(loader, "masked_targets", False) else None
    weights = masked_weights([batch[1] for batch in batches], ddp) if batches else None
    policy_loss = getattr(loader, "loss", None)  # RL: the loader's policy loss on its rollouts (gpt2lab.rl.rollout)
    for micro in range(grad_accum):
        batch = batches[micro] if batches else loader.next_batch()
        x, y, *docs = batch  # (B, T) each
        kw = {"doc_ids": docs[0]} if docs else {}  # SFT with a document mask: each token's conversation (B, T)
        if weights and weights[micro] == 0:  # no trained token: its mean loss is 0/0; one dummy target, weight 0
            y = torch.full_like(y, -1)
            y[0, 0] = 0
        sync = not ddp or micro == grad_accum - 1
        with nullcontext() if sync else model.no_sync():
            with autocast():
                _, loss = (None, policy_loss(model, batch, y)) if policy_loss else model(x, y, **kw)
            loss = loss / grad_accum if weights is None else loss * weights[micro]
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def masked_weights(targets: list[torch.Tensor], ddp: bool) -> list[float]:
    """Each micro-batch's factor on its mean loss so that the step's loss is the mean over every trained token
    (target != -1) of every micro-batch on every rank: n_micro * world_size / n_global (DDP then divides the
    gradient by world_size). A micro-batch without a trained token gets 0."""
    counts = torch.stack([(y != -1).sum() for y in targets]).float()
    total = counts.sum()
    world_size = dist.get_world_size() if ddp else 1
    if ddp:
        dist.all_reduce(total)
    return (counts * world_size / total.clamp(min=1)).tolist()


def train_step(
    model: torch.nn.Module,
    raw_model: GPT,
    optimizer: torch.optim.Optimizer,
    loader,
    grad_accum: int,
    *,
    autocast,
    grad_clip: float,
    world_size: int = 1,
    stop: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float, bool]:
    """One optimizer step; return (loss averaged over ranks, grad norm, whether any rank must stop).

    The only host sync of the step reads these three numbers, before ``optimizer.step()``: a
    non-finite loss or norm skips the update, and the caller stops. With a scaler (float16) the
    gradients are unscaled before clipping, an inf/NaN norm is the scaler's skipped step (the
    caller counts it) and the scale is updated.
    """
    ddp = world_size > 1
    optimizer.zero_grad(set_to_none=True)
    # FSDP2 has no no_sync: it reduce-scatters every micro-step, so only sharded gradients accumulate
    loss = forward_backward(model, loader, grad_accum, autocast, ddp and hasattr(model, "no_sync"), scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: the norm of sharded (DTensor) gradients is a DTensor
        norm = norm.full_tensor()
    stats = torch.stack([loss.float(), norm.float(), torch.tensor(float(stop), device=loss.device)])
    if ddp:  # one collective: the loss mean and "does any rank stop" (norm is the same everywhere)
        dist.all_reduce(stats)
        stats = stats / torch.tensor([world_size, world_size, 1.0], device=stats.device)
    loss_value, norm_value, stop_value = stats.tolist()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    raw_model.update_moe_bias()  # MoE: the step's expert loads (all ranks) steer the balancing bias; else nothing
    if scaler is not None:
        scaler.update()  # an inf/NaN gradient (found by unscale_) halves the scale, else it may grow
    return loss_value, norm_value, stop_value > 0


@torch.no_grad()
def val_loss(model: GPT, loader, batches: int, autocast, world_size: int = 1) -> float:
    """Mean loss over the first ``batches`` batches of the val split (every rank its slice)."""
    model.eval()
    loader.reset()
    total, count = None, torch.zeros(())
    masked = getattr(loader, "masked_targets", False)  # SFT: the mean over trained tokens, not over batches
    batches = min(batches, loader.batches_per_epoch)  # a small val split: each batch once
    for _ in range(batches):
        x, y, *docs = loader.next_batch()
        with autocast():
            _, loss = model(x, y, **({"doc_ids": docs[0]} if docs else {}))
        if masked:  # a batch without a trained token (mean 0/0) adds nothing
            n = (y != -1).sum().float()
            loss, count = torch.nan_to_num(loss.float()) * n, count.to(n.device) + n
        total = loss.float() if total is None else total + loss.float()
    if masked:
        stats = torch.stack([total, count])
        if world_size > 1:
            dist.all_reduce(stats)
        model.train()
        return (stats[0] / stats[1].clamp(min=1)).item()
    total = total / batches
    if world_size > 1:
        dist.all_reduce(total)
        total = total / world_size
    model.train()
    return total.item()


# ----------------------------------------------------------------------------- run set-up


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


def peak_flops(device: str) -> float | None:
    """The GPU's dense bf16 peak FLOP/s, or None when unknown (CPU, unlisted GPU)."""
    caps = hardware.capabilities(device)
    if caps.device_type != "cuda":
        return None
    return next((flops for key, flops in PEAK_FLOPS if key in caps.name), None)


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
    hellaswag_examples: list | None = None  # loaded at the first HellaSwag evaluation
    scaler: torch.amp.GradScaler | None = None  # float16 only: the loss scale, saved with each checkpoint
    skipped_steps: int = 0  # float16 steps the scaler skipped (an overflowed gradient), over the whole run
    resumed_from: Path | None = None  # the checkpoint resumed: an SFT run's tokenizer is read there, not in its base


def _dataset_check(cfg: RunConfig) -> None:
    from gpt2lab.data.shards import read_manifest

    manifest = read_manifest(cfg.data.path)  # clear error on a missing or unfinished folder
    vocab = int(manifest.get("tokenizer", {}).get("vocab_size", 50257))
    if cfg.model.vocab_size < vocab:
        raise Gpt2LabError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of {cfg.data.path} ({vocab})"
        )


def sft_section(cfg: RunConfig):
    """The [sft] section when this run fine-tunes a model on conversations (sft.data set), else None."""
    sft = getattr(cfg, "sft", None)
    return sft if sft is not None and sft.data else None


def rl_section(cfg: RunConfig):
    """The [rl] section when this run trains a policy on a task's rewards (rl.task set), else None."""
    rl = getattr(cfg, "rl", None)
    return rl if rl is not None and rl.task else None


def setup(cfg: RunConfig, run_dir: Path, info: DistInfo, resume: bool) -> Run:
    """Check everything that can fail early, then build the model, optimizer and loaders (and restore)."""
    from gpt2lab.data.loader import ShardLoader, open_val_loader

    grad_accum = grad_accum_steps(cfg, info.world_size)
    sft = sft_section(cfg)
    rl = rl_section(cfg)
    tune = sft or rl  # fine-tuning a model (SFT or RL) rather than pretraining on shards
    if tune is None:
        _dataset_check(cfg)
    if cfg.eval.hellaswag_every:
        from gpt2lab.eval.hellaswag import locate

        locate()  # the examples must be at hand before hours of training, not after
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
    if tune is not None and not resume:  # SFT and RL start from the weights of the model they fine-tune
        from gpt2lab.chat.base import load_base_weights

        load_base_weights(raw_model, tune.model)
    optimizer = make_optimizer(raw_model, cfg.optim, info.device)
    kw = dict(rank=info.rank, world_size=info.world_size, device=info.device)
    if sft is not None:  # conversations packed into rows, targets -1 outside the assistant's tokens
        from gpt2lab.sft.data import sft_loaders

        loader, val_loader = sft_loaders(cfg, cfg.train.micro_batch, **kw, resume_from=latest if resume else None)
    elif rl is not None:  # on-policy rollouts of the model being trained, rewarded by the task's verifier
        from gpt2lab.rl.rollout import RolloutLoader

        tok = tokenizer_match.run_tokenizer(cfg, latest if resume else None)
        loader = RolloutLoader(raw_model, tok, rl, cfg.train.micro_batch, info.rank, info.world_size, cfg.train.seed)
        val_loader = None
    else:
        loader = ShardLoader(
            cfg.data.path, "train", cfg.train.micro_batch, cfg.model.block_size, shuffle=cfg.data.shuffle,
            seed=cfg.data.seed, **kw,
        )  # fmt: skip
        val_loader = None
    if cfg.eval.val_every > 0 and tune is None:
        val_loader, note = open_val_loader(cfg.data.path, cfg.train.micro_batch, cfg.model.block_size, **kw)
        if note:
            hardware.print_notices([note if val_loader else f"val loss unavailable: {note}"])
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
        scaler=scaler, skipped_steps=skipped, resumed_from=latest if resume else None,
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


# ----------------------------------------------------------------------------- the loop


def _print0(info: DistInfo, text: str) -> None:
    if info.is_main:
        print(text, flush=True)


def _samples(run: Run, step: int) -> None:
    from gpt2lab.inference.generate import generate_ids

    e = run.cfg.eval
    tok = tokenizer_match.run_tokenizer(run.cfg, run.resumed_from)
    run.raw_model.eval()
    with fsdp.gathered(run.raw_model, run.cfg.train.reshard_after_forward):  # fsdp: whole weights on each rank
        outs = generate_ids(
            run.raw_model, tok.encode(e.sample_prompt), num_samples=e.sample_count, max_new_tokens=e.sample_tokens,
            top_k=50, seed=run.cfg.train.seed + step,
        )  # fmt: skip
    run.raw_model.train()
    for i, ids in enumerate(outs):
        _print0(run.info, f"sample {i}: {e.sample_prompt}{tok.decode(ids)!r}")


def _hellaswag(run: Run) -> float:
    """HellaSwag acc_norm of the raw model through the evaluation package, every rank its share."""
    from gpt2lab.eval import hellaswag

    if run.hellaswag_examples is None:
        run.hellaswag_examples = hellaswag.load_examples(hellaswag.locate(), run.cfg.eval.hellaswag_limit or None)
    result = hellaswag.evaluate_hellaswag(
        run.raw_model, tokenizer_match.run_tokenizer(run.cfg, run.resumed_from), run.hellaswag_examples,
        run.info.device,
        batch_size=max(1, run.cfg.train.micro_batch // 4), rank=run.info.rank, world_size=run.info.world_size,
    )  # fmt: skip
    run.raw_model.train()
    return float(result["acc_norm"])


def _periodic(every: int, step: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


def _oom_error(cfg: RunConfig, device: str) -> Gpt2LabError:
    """Which knob to turn, instead of the allocator's dump."""
    b = cfg.train.micro_batch
    return Gpt2LabError(
        f"out of memory on {device} with train.micro_batch={b} x model.block_size="
        f"{cfg.model.block_size}; lower train.micro_batch (e.g. --set train.micro_batch={max(1, b // 2)}, or auto): "
        f"gradient accumulation keeps train.total_batch the same; or lower {', '.join(hardware.memory_knobs(cfg))}"
    )


def _compile_error(e: Exception) -> Gpt2LabError | None:
    """A torch.compile failure as one line (the checks in gpt2lab.runtime.hardware catch the known causes first)."""
    if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return None
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    why = first.strip()[:200]
    return Gpt2LabError(f"torch.compile failed on this machine ({why}); run with --set perf.compile=false")


def _count_skip(run: Run, step: int, loss: float, norm: float, in_a_row: int, last_ckpt) -> int:
    """float16: an overflowed gradient is the scaler's skipped step; return the skips in a row so far."""
    if run.scaler is not None and math.isfinite(loss) and not math.isfinite(norm):
        run.skipped_steps += 1
        if in_a_row + 1 >= MAX_SKIPPED_IN_A_ROW:
            raise Gpt2LabError(
                f"step {step}: float16 gradients overflowed {in_a_row + 1} steps in a row (loss scale "
                f"{run.scaler.get_scale():.3g}); last good checkpoint: {last_ckpt or 'none'}. "
                "Try train.dtype=bfloat16 or float32, or a lower optim.lr"
            )
        return in_a_row + 1
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise Gpt2LabError(
            f"step {step}: the loss is {loss} (grad norm {norm}); training stopped before this update. "
            f"Last good checkpoint: {last_ckpt or 'none'}. Try a lower optim.lr or more optim.warmup_steps"
        )
    return 0


def loop(run: Run, stop: StopSignals) -> Path | None:
    """Train from run.start_step to train.max_steps; return the last checkpoint folder (rank 0)."""
    cfg, info = run.cfg, run.info
    ws = info.world_size
    log = MetricsLog(run.run_dir, info.is_main, cfg.log.tensorboard, run.start_step if run.start_step else None)
    flops_per_token = run.raw_model.flops_per_token(cfg.model.block_size)
    peak = peak_flops(info.device)
    last_ckpt, step, metrics = ckpt.find_latest(run.run_dir), run.start_step, {}
    skips_in_a_row = 0
    try:
        if note := speed_note(cfg.reference):  # the preset's measured speed, beside this run's tok/s below
            _print0(info, note)
        if step == 0 and run.val_loader is not None:
            metrics["val_loss"] = val_loss(run.raw_model, run.val_loader, cfg.eval.val_batches, run.autocast, ws)
            log.log(0, val_loss=metrics["val_loss"])
            note = val_loss_note(cfg.reference, 0, metrics["val_loss"])  # with whether it is within the band
            _print0(info, f"step {0:>6} | val loss {metrics['val_loss']:.4f}{note}")
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim)
            set_lr(run.optimizer, lr)
            try:
                loss, norm, stopping = train_step(
                    run.model, run.raw_model, run.optimizer, run.loader, run.grad_accum, autocast=run.autocast,
                    grad_clip=cfg.optim.grad_clip, world_size=ws, stop=stop.requested, scaler=run.scaler,
                )  # fmt: skip
            except torch.OutOfMemoryError:  # CUDA (and other accelerators) raise it instead of dying
                raise _oom_error(cfg, info.device) from None
            except Exception as e:
                if (error := _compile_error(e)) is not None:
                    raise error from None
                raise
            dt = time.perf_counter() - t0
            step += 1
            skips_in_a_row = _count_skip(run, step, loss, norm, skips_in_a_row, last_ckpt)
            last = step == cfg.train.max_steps
            if step % cfg.log.every == 0 or last or step == run.start_step + 1:
                tps = cfg.train.total_batch / dt
                record = dict(train_loss=loss, lr=lr, grad_norm=norm, ms_per_step=dt * 1e3, tokens_per_s=tps)
                if run.scaler is not None:  # float16: the loss scale and the steps it skipped so far
                    record |= dict(loss_scale=run.scaler.get_scale(), skipped_steps=run.skipped_steps)
                    if not math.isfinite(norm):
                        del record["grad_norm"]  # not a number JSON can hold; the skip is counted instead
                if peak:
                    record["mfu"] = flops_per_token * tps / (peak * ws)
                record |= run.raw_model.moe_stats()  # MoE: max/mean expert load and each block's expert shares
                record |= run.loader.stats() if hasattr(run.loader, "stats") else {}  # RL: reward, lengths, ...
                log.log(step, **record)
                mfu = f" | MFU {record['mfu']:6.1%}" if peak else ""
                mfu += f" | reward {record['reward']:.3f}" if "reward" in record else ""
                mfu += f" | held-out {record['eval_reward']:.3f}" if "eval_reward" in record else ""
                mfu += f" sampled {record['eval_sampled_reward']:.3f}" if "eval_sampled_reward" in record else ""
                mfu += f" | skipped {run.skipped_steps}" if run.skipped_steps else ""
                mfu += f" | moe max/mean {record['moe_load_max_over_mean']:.2f}" if "moe_load" in record else ""
                _print0(
                    info,
                    f"step {step:>6}/{cfg.train.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                    f"{dt * 1e3:7.1f} ms | {tps:9,.0f} tok/s{mfu}",
                )
            if run.val_loader is not None and _periodic(cfg.eval.val_every, step, last):
                metrics["val_loss"] = val_loss(run.raw_model, run.val_loader, cfg.eval.val_batches, run.autocast, ws)
                log.log(step, val_loss=metrics["val_loss"])
                note = val_loss_note(cfg.reference, step, metrics["val_loss"])
                _print0(info, f"step {step:>6} | val loss {metrics['val_loss']:.4f}{note}")
            if _periodic(cfg.eval.hellaswag_every, step, last):
                metrics["hellaswag"] = _hellaswag(run)
                log.log(step, hellaswag=metrics["hellaswag"])
                _print0(info, f"step {step:>6} | hellaswag {metrics['hellaswag']:.4f}")
            # fsdp: every rank runs the sharded model (the same draws), rank 0 prints
            if _periodic(cfg.eval.sample_every, step, last) and (info.is_main or cfg.train.parallel == "fsdp"):
                _samples(run, step)
            if last or stopping or (cfg.train.save_every and step % cfg.train.save_every == 0):
                last_ckpt = save(run, step, {"train_loss": loss, **metrics}) or last_ckpt
            if stopping:
                _print0(
                    info,
                    f"stopped by a signal after step {step}; checkpoint saved to {last_ckpt}. "
                    f"Continue with: gpt2lab train --resume {run.run_dir}",
                )
                return last_ckpt
    finally:
        log.close()
    _print0(info, f"done: {step} steps; checkpoint {last_ckpt}. Sample with: gpt2lab sample --model {run.run_dir}")
    return last_ckpt


def _finished(folder: Path, cfg: RunConfig) -> bool:
    """True if the checkpoint ends a run of exactly this config (so running it again is a no-op)."""
    state = ckpt.read_json(folder / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY) or {}
    return state.get("config") == cfg.to_dict() and state.get("step", -1) >= cfg.train.max_steps


def _saved_micro_batch(folder: Path) -> int | None:
    state = ckpt.read_json(folder / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY) or {}
    return (state.get("config") or {}).get("train", {}).get("micro_batch")


def _agree_micro_batch(cfg: RunConfig, info: DistInfo) -> None:
    """Under DDP every rank must use the same micro-batch: the smallest that auto found (a divisor too)."""
    t = torch.tensor([cfg.train.micro_batch], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    cfg.train.micro_batch = int(t.item())


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Path | None:
    """Run (or resume) training in run_dir; the same call works under torchrun. Returns the last checkpoint.

    ``cfg`` is a gpt2lab.config.Config. Nothing is written before every check has passed
    (gpt2lab.runtime.hardware.preflight, then setup). ``train.micro_batch = None`` (auto) is resolved
    here, or taken from the run's checkpoint, so a resume continues with the same micro-batch.
    """
    run_dir = Path(run_dir)
    latest = ckpt.find_latest(run_dir)
    tokenizer_match.agree(cfg, latest if resume else None)  # model vocab from the shards' tokenizer; same on resume
    if cfg.train.micro_batch is None and latest is not None:  # auto was resolved when this run started
        cfg.train.micro_batch = _saved_micro_batch(latest)
    if not resume and latest is not None and _finished(latest, cfg):
        print(f"{run_dir} is already trained with this config ({latest.name}); nothing to do")
        return latest
    info = init_distributed(None if cfg.train.device == "auto" else cfg.train.device)
    try:
        auto_batch = cfg.train.micro_batch is None
        hardware.print_notices(hardware.preflight(cfg, info.device, info.world_size))
        if auto_batch and info.is_distributed:
            _agree_micro_batch(cfg, info)
        run = setup(cfg, run_dir, info, resume)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(cfg.to_toml())
            tokenizer_match.copy_into_run(cfg, run_dir, latest if resume else None)  # the tokenizer travels along
            n = run.raw_model.num_params()
            _print0(
                info,
                f"{'resuming at step ' + str(run.start_step) if resume else 'training'} in {run_dir}: "
                f"{n / 1e6:.1f}M parameters, {info.world_size} x {info.device}, grad accumulation {run.grad_accum}, "
                f"{cfg.train.total_batch:,} tokens per step",
            )
        with StopSignals() as stop:
            last = loop(run, stop)
        if info.is_distributed:  # no rank tears the group down while a peer still talks to it (gloo may abort)
            dist.barrier()
        return last
    finally:
        dcp_checkpoint.finish_pending()  # train.async_save: the last checkpoint gets its name before the run ends
        destroy_distributed()
