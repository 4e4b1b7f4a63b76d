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
import operator
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
from gpt2lab.train.objective import Evaluation, Objective
from gpt2lab.train.optim import OptimConfig, apply_schedule
from gpt2lab.train.perf import PerfConfig
from gpt2lab.train.reference import speed_note, val_loss_note
from gpt2lab.train.run import NEXT_TOKEN, Run, agree_micro_batch, finished, save, saved_micro_batch, setup
from gpt2lab.train.runlog import MetricsLog, StopSignals, step_suffix

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
    model: torch.nn.Module,
    loader,
    grad_accum: int,
    autocast,
    ddp: bool,
    scaler: torch.amp.GradScaler | None = None,
    objective: Objective = NEXT_TOKEN,
) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over grad_accum micro-batches; return that loss (0-dim).

    Each micro-loss is divided by grad_accum, so k micro-batches of B/k give the gradient of
    one batch of B. Under DDP only the last backward all-reduces (no_sync on the others). With a
    scaler (float16) the loss is scaled before each backward, so small gradients do not underflow.
    The objective gives each micro-batch's loss (next-token, masked, or a policy loss).
    """
    total = None
    # a masked objective (SFT, RL): the step's micro-batches are read first, so the loss can be averaged over the
    # trained tokens of the whole global batch, not micro-batch by micro-batch
    batches = [loader.next_batch() for _ in range(grad_accum)] if objective.masked else None
    weights = masked_weights([batch[1] for batch in batches], ddp) if batches else None
    for micro in range(grad_accum):
        batch = batches[micro] if batches else loader.next_batch()
        y = batch[1]  # (B, T)
        if weights and weights[micro] == 0:  # no trained token: its mean loss is 0/0; one dummy target, weight 0
            y = torch.full_like(y, -1)
            y[0, 0] = 0
        sync = not ddp or micro == grad_accum - 1
        with nullcontext() if sync else model.no_sync():
            with autocast():
                loss = objective.loss(model, batch, y)
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
    objective: Objective = NEXT_TOKEN,
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
    loss = forward_backward(model, loader, grad_accum, autocast, ddp and hasattr(model, "no_sync"), scaler, objective)
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
    else:  # a skipped step moves no weight, and no routing bias: its loads are dropped (the same on every rank)
        for moe in raw_model.moe_layers():
            moe.discard_load()
    if scaler is not None:
        scaler.update()  # an inf/NaN gradient (found by unscale_) halves the scale, else it may grow
    return loss_value, norm_value, stop_value > 0


@torch.no_grad()
def val_loss(
    model: GPT, loader, batches: int, autocast, world_size: int = 1, objective: Objective = NEXT_TOKEN
) -> float:
    """Mean loss over the first ``batches`` batches of the val split (every rank its slice)."""
    model.eval()
    loader.reset()
    total, count = None, torch.zeros(())
    masked = objective.masked  # SFT: the mean over trained tokens, not over batches
    batches = min(batches, loader.batches_per_epoch)  # a small val split: each batch once
    for _ in range(batches):
        batch = loader.next_batch()
        y = batch[1]
        with autocast():
            loss = objective.loss(model, batch, y)
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


def peak_flops(device: str) -> float | None:
    """The GPU's dense bf16 peak FLOP/s, or None when unknown (CPU, unlisted GPU)."""
    caps = hardware.capabilities(device)
    if caps.device_type != "cuda":
        return None
    return next((flops for key, flops in PEAK_FLOPS if key in caps.name), None)


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
            metrics["val_loss"] = val_loss(
                run.raw_model, run.val_loader, cfg.eval.val_batches, run.autocast, ws, run.objective
            )
            log.log(0, val_loss=metrics["val_loss"])
            note = val_loss_note(cfg.reference, 0, metrics["val_loss"])  # with whether it is within the band
            _print0(info, f"step {0:>6} | val loss {metrics['val_loss']:.4f}{note}")
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            lr = apply_schedule(run.optimizer, step, cfg.optim)
            try:
                loss, norm, stopping = train_step(
                    run.model, run.raw_model, run.optimizer, run.loader, run.grad_accum, autocast=run.autocast,
                    grad_clip=cfg.optim.grad_clip, world_size=ws, stop=stop.requested, scaler=run.scaler,
                    objective=run.objective,
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
                tps = operator.truediv(*run.objective.step_tokens(cfg.train.total_batch, dt))  # RL: rollouts apart
                record = dict(train_loss=loss, lr=lr, grad_norm=norm, ms_per_step=dt * 1e3, tokens_per_s=tps)
                if run.scaler is not None:  # float16: the loss scale and the steps it skipped so far
                    record |= dict(loss_scale=run.scaler.get_scale(), skipped_steps=run.skipped_steps)
                    if not math.isfinite(norm):
                        del record["grad_norm"]  # not a number JSON can hold; the skip is counted instead
                if peak:
                    record["mfu"] = flops_per_token * tps / (peak * ws)
                record |= run.raw_model.moe_stats()  # MoE: max/mean expert load and each block's expert shares
                record |= run.objective.stats()  # RL: reward, lengths, held-out rewards, ...
                log.log(step, **record)
                _print0(
                    info,
                    f"step {step:>6}/{cfg.train.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                    f"{dt * 1e3:7.1f} ms | {tps:9,.0f} tok/s{step_suffix(record, run.skipped_steps)}",
                )
            if run.val_loader is not None and _periodic(cfg.eval.val_every, step, last):
                metrics["val_loss"] = val_loss(
                    run.raw_model, run.val_loader, cfg.eval.val_batches, run.autocast, ws, run.objective
                )
                log.log(step, val_loss=metrics["val_loss"])
                note = val_loss_note(cfg.reference, step, metrics["val_loss"])
                _print0(info, f"step {step:>6} | val loss {metrics['val_loss']:.4f}{note}")
            for evaluation in run.evaluations:  # HellaSwag (given by gpt2lab.train.command)
                if _periodic(evaluation.every, step, last):
                    metrics[evaluation.name] = evaluation.measure(run)
                    log.log(step, **{evaluation.name: metrics[evaluation.name]})
                    _print0(info, f"step {step:>6} | {evaluation.name} {metrics[evaluation.name]:.4f}")
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


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    objective: Objective | None = None,
    evaluations: tuple[Evaluation, ...] | list[Evaluation] = (),
) -> Path | None:
    """Run (or resume) training in run_dir; the same call works under torchrun. Returns the last checkpoint.

    ``objective``: what the stage trains for (None: pretraining, ``gpt2lab.train.objective.NextToken``);
    ``evaluations``: measurements every so many steps (``gpt2lab.train.command`` gives HellaSwag's).

    ``cfg`` is a gpt2lab.config.Config. Nothing is written before every check has passed
    (gpt2lab.runtime.hardware.preflight, then setup). ``train.micro_batch = None`` (auto) is resolved
    here, or taken from the run's checkpoint, so a resume continues with the same micro-batch.
    """
    run_dir = Path(run_dir)
    latest = ckpt.find_latest(run_dir)
    tokenizer_match.agree(cfg, latest if resume else None)  # model vocab from the shards' tokenizer; same on resume
    if cfg.train.micro_batch is None and latest is not None:  # auto was resolved when this run started
        cfg.train.micro_batch = saved_micro_batch(latest)
    if not resume and latest is not None and finished(latest, cfg):
        print(f"{run_dir} is already trained with this config ({latest.name}); nothing to do")
        return latest
    info = init_distributed(None if cfg.train.device == "auto" else cfg.train.device)
    try:
        auto_batch = cfg.train.micro_batch is None
        hardware.print_notices(hardware.preflight(cfg, info.device, info.world_size))
        if auto_batch and info.is_distributed:
            agree_micro_batch(cfg, info)
        run = setup(cfg, run_dir, info, resume, objective, tuple(evaluations))
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
