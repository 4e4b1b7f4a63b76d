"""The training loop: one CPU, one GPU, or many through torchrun (DDP), with exact resume.

One optimizer step = ``grad_accum`` micro-batches of ``train.micro_batch`` x ``model.block_size``
tokens on each of ``world_size`` ranks, so that ``train.total_batch`` tokens enter every step;
``grad_accum`` is derived, never configured. Under DDP the gradients are all-reduced once per
step (``no_sync`` on the other micro-steps) and only rank 0 writes logs and checkpoints. On
CUDA: bf16 autocast, TF32 matmuls and ``torch.compile``; on CPU: float32, eager. The speed
switches ([perf]: compile mode, attention kernel, fused loss, recompute) live in ``gpt2lab.perf``.

Departures from nanoGPT's train.py: the config is dataclasses + TOML (never ``exec``); the
loss and the grad norm are read to the host once per step, before ``optimizer.step()``, so a
NaN/inf never reaches the weights; a SIGTERM/SIGINT finishes the current step and saves.
"""

from __future__ import annotations

import math
import random
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from gpt2lab import checkpoint as ckpt
from gpt2lab.dist import DistInfo, destroy_distributed, init_distributed
from gpt2lab.errors import Gpt2LabError
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import lr_at, make_optimizer, set_lr
from gpt2lab.perf import prepare_model, step_context
from gpt2lab.runlog import MetricsLog, StopSignals

if TYPE_CHECKING:
    import argparse

    from gpt2lab.config import Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

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
    micro_batch: int = 64  # sequences per forward/backward on each rank; lower it on CUDA OOM
    seed: int = 1337  # seed of the weight init (and of the python/numpy/torch RNGs)
    device: str = "auto"  # auto (cuda, mps, cpu: the best present), cpu, cuda, mps
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 elsewhere), bfloat16, float32
    save_every: int = 1000  # steps between checkpoints (0 = only at the end and on a signal)
    keep_checkpoints: int = 3  # newest checkpoints kept in RUN_DIR/checkpoints (0 = all)

    def validate(self, model: GPTConfig) -> list[str]:
        problems = []
        for name in ("max_steps", "total_batch", "micro_batch"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if self.save_every < 0 or self.keep_checkpoints < 0:
            problems.append("train.save_every and train.keep_checkpoints must be >= 0")
        if self.dtype not in ("auto", *DTYPES):
            problems.append(f"train.dtype must be auto, {' or '.join(DTYPES)} (got {self.dtype!r})")
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            problems.append(f"train.device must be auto, cpu, cuda[:N] or mps (got {self.device!r})")
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append(f"train.device is {self.device!r} but no CUDA GPU is available")
        per_rank = self.micro_batch * model.block_size
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


# ----------------------------------------------------------------------------- one step


def forward_backward(model: torch.nn.Module, loader, grad_accum: int, autocast, ddp: bool) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over grad_accum micro-batches; return that loss (0-dim).

    Each micro-loss is divided by grad_accum, so k micro-batches of B/k give the gradient of
    one batch of B. Under DDP only the last backward all-reduces (no_sync on the others).
    """
    total = None
    for micro in range(grad_accum):
        x, y = loader.next_batch()  # (B, T) each
        sync = not ddp or micro == grad_accum - 1
        with nullcontext() if sync else model.no_sync():
            with autocast():
                _, loss = model(x, y)
            loss = loss / grad_accum
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


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
) -> tuple[float, float, bool]:
    """One optimizer step; return (loss averaged over ranks, grad norm, whether any rank must stop).

    The only host sync of the step reads these three numbers, before ``optimizer.step()``: a
    non-finite loss or norm skips the update, and the caller stops.
    """
    ddp = world_size > 1
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(model, loader, grad_accum, autocast, ddp)
    norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    stats = torch.stack([loss.float(), norm.float(), torch.tensor(float(stop), device=loss.device)])
    if ddp:  # one collective: the loss mean and "does any rank stop" (norm is the same everywhere)
        dist.all_reduce(stats)
        stats = stats / torch.tensor([world_size, world_size, 1.0], device=stats.device)
    loss_value, norm_value, stop_value = stats.tolist()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    return loss_value, norm_value, stop_value > 0


@torch.no_grad()
def val_loss(model: GPT, loader, batches: int, autocast, world_size: int = 1) -> float:
    """Mean loss over the first ``batches`` batches of the val split (every rank its slice)."""
    model.eval()
    loader.reset()
    total = None
    for _ in range(batches):
        x, y = loader.next_batch()
        with autocast():
            _, loss = model(x, y)
        total = loss.float() if total is None else total + loss.float()
    total = total / batches
    if world_size > 1:
        dist.all_reduce(total)
        total = total / world_size
    model.train()
    return total.item()


# ----------------------------------------------------------------------------- run set-up


def precision(dtype: str, device_type: str) -> torch.dtype:
    """The autocast dtype for train.dtype ("auto": bfloat16 on CUDA, float32 elsewhere); TF32 on CUDA."""
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any matmul left in float32
        torch.backends.cudnn.allow_tf32 = True
    return DTYPES.get(dtype, torch.bfloat16 if device_type == "cuda" else torch.float32)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
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
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


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

    cfg: Config
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


def _dataset_check(cfg: Config) -> None:
    from gpt2lab.data.shards import read_manifest

    manifest = read_manifest(cfg.data.path)  # clear error on a missing or unfinished folder
    vocab = int(manifest.get("tokenizer", {}).get("vocab_size", 50257))
    if cfg.model.vocab_size < vocab:
        raise Gpt2LabError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of {cfg.data.path} ({vocab})"
        )


def setup(cfg: Config, run_dir: Path, info: DistInfo, resume: bool) -> Run:
    """Check everything that can fail early, then build the model, optimizer and loaders (and restore)."""
    from gpt2lab.data.loader import ShardLoader

    grad_accum = grad_accum_steps(cfg, info.world_size)
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
    device_type = torch.device(info.device).type
    autocast = step_context(device_type, precision(cfg.train.dtype, device_type))
    seed_everything(cfg.train.seed)
    raw_model = GPT(cfg.model).to(info.device)
    optimizer = make_optimizer(raw_model, cfg.optim, device_type)
    kw = dict(rank=info.rank, world_size=info.world_size, device=info.device)
    loader = ShardLoader(
        cfg.data.path, "train", cfg.train.micro_batch, cfg.model.block_size, shuffle=cfg.data.shuffle,
        seed=cfg.data.seed, **kw,
    )  # fmt: skip
    val_loader = None
    if cfg.eval.val_every > 0:
        val_loader = ShardLoader(cfg.data.path, "val", cfg.train.micro_batch, cfg.model.block_size, shuffle=False, **kw)
    start_step = 0
    if resume:
        start_step = restore(latest, raw_model, optimizer, loader, info)
    model = prepare_model(raw_model, cfg.perf, device_type)  # compiled and/or fused loss, per [perf]
    if info.is_distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[info.local_rank] if device_type == "cuda" else None)
    return Run(cfg, run_dir, info, raw_model, model, optimizer, loader, val_loader, grad_accum, autocast, start_step)


def restore(folder: Path, raw_model: GPT, optimizer, loader, info: DistInfo) -> int:
    """Load a training checkpoint into the fresh model/optimizer/loader; return its step."""
    state, rng = ckpt.load_training_checkpoint(folder, raw_model, optimizer)
    loader.load_state_dict(state["loader"])
    prefix = f"rank{info.rank}." if f"rank{info.rank}.torch" in rng else "rank0."
    plain = state["rng"][min(info.rank, len(state["rng"]) - 1)]
    ckpt.set_rng_state({k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}, plain)
    return int(state["step"])


def _gather(obj: object, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def save(run: Run, step: int, metrics: dict) -> Path | None:
    """Every rank gives its RNG state; rank 0 writes the checkpoint. Returns its folder on rank 0."""
    tensors, plain = ckpt.rng_state()
    gathered = _gather((tensors, plain), run.info.world_size)
    if not run.info.is_main:
        return None
    state = {
        "step": step,
        "world_size": run.info.world_size,
        "loader": run.loader.state_dict(),  # the same on every rank
        "rng": [p for _, p in gathered],
        "metrics": metrics,
        "config": run.cfg.to_dict(),
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rng = {f"rank{r}.{k}": v for r, (t, _) in enumerate(gathered) for k, v in t.items()}
    try:
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
    from gpt2lab.generate import generate_ids
    from gpt2lab.tokenizer import get_tokenizer

    e = run.cfg.eval
    tok = get_tokenizer()
    run.raw_model.eval()
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
    from gpt2lab.tokenizer import get_tokenizer

    if run.hellaswag_examples is None:
        run.hellaswag_examples = hellaswag.load_examples(hellaswag.locate(), run.cfg.eval.hellaswag_limit or None)
    result = hellaswag.evaluate_hellaswag(
        run.raw_model, get_tokenizer(), run.hellaswag_examples, run.info.device,
        batch_size=max(1, run.cfg.train.micro_batch // 4), rank=run.info.rank, world_size=run.info.world_size,
    )  # fmt: skip
    run.raw_model.train()
    return float(result["acc_norm"])


def _periodic(every: int, step: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


def _oom_error(cfg: Config) -> Gpt2LabError:
    return Gpt2LabError(
        f"CUDA out of memory with train.micro_batch={cfg.train.micro_batch} x model.block_size="
        f"{cfg.model.block_size}; lower train.micro_batch (e.g. --set train.micro_batch="
        f"{max(1, cfg.train.micro_batch // 2)}): gradient accumulation keeps train.total_batch the same"
    )


def loop(run: Run, stop: StopSignals) -> Path | None:
    """Train from run.start_step to train.max_steps; return the last checkpoint folder (rank 0)."""
    cfg, info = run.cfg, run.info
    ws = info.world_size
    log = MetricsLog(run.run_dir, info.is_main, cfg.log.tensorboard, run.start_step if run.start_step else None)
    flops_per_token = run.raw_model.flops_per_token(cfg.model.block_size)
    peak = peak_flops(info.device)
    last_ckpt, step, metrics = ckpt.find_latest(run.run_dir), run.start_step, {}
    try:
        if step == 0 and cfg.eval.val_every > 0:
            metrics["val_loss"] = val_loss(run.raw_model, run.val_loader, cfg.eval.val_batches, run.autocast, ws)
            log.log(0, val_loss=metrics["val_loss"])
            _print0(info, f"step {0:>6} | val loss {metrics['val_loss']:.4f}")
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim)
            set_lr(run.optimizer, lr)
            try:
                loss, norm, stopping = train_step(
                    run.model, run.raw_model, run.optimizer, run.loader, run.grad_accum, autocast=run.autocast,
                    grad_clip=cfg.optim.grad_clip, world_size=ws, stop=stop.requested,
                )  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                raise _oom_error(cfg) from None
            dt = time.perf_counter() - t0
            step += 1
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise Gpt2LabError(
                    f"step {step}: the loss is {loss} (grad norm {norm}); training stopped before this update. "
                    f"Last good checkpoint: {last_ckpt or 'none'}. Try a lower optim.lr or more optim.warmup_steps"
                )
            last = step == cfg.train.max_steps
            if step % cfg.log.every == 0 or last or step == run.start_step + 1:
                tps = cfg.train.total_batch / dt
                record = dict(train_loss=loss, lr=lr, grad_norm=norm, ms_per_step=dt * 1e3, tokens_per_s=tps)
                if peak:
                    record["mfu"] = flops_per_token * tps / (peak * ws)
                log.log(step, **record)
                mfu = f" | MFU {record['mfu']:6.1%}" if peak else ""
                _print0(
                    info,
                    f"step {step:>6}/{cfg.train.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                    f"{dt * 1e3:7.1f} ms | {tps:9,.0f} tok/s{mfu}",
                )
            if _periodic(cfg.eval.val_every, step, last):
                metrics["val_loss"] = val_loss(run.raw_model, run.val_loader, cfg.eval.val_batches, run.autocast, ws)
                log.log(step, val_loss=metrics["val_loss"])
                _print0(info, f"step {step:>6} | val loss {metrics['val_loss']:.4f}")
            if _periodic(cfg.eval.hellaswag_every, step, last):
                metrics["hellaswag"] = _hellaswag(run)
                log.log(step, hellaswag=metrics["hellaswag"])
                _print0(info, f"step {step:>6} | hellaswag {metrics['hellaswag']:.4f}")
            if _periodic(cfg.eval.sample_every, step, last) and info.is_main:
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


def _finished(folder: Path, cfg: Config) -> bool:
    """True if the checkpoint ends a run of exactly this config (so running it again is a no-op)."""
    state = ckpt.read_json(folder / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY) or {}
    return state.get("config") == cfg.to_dict() and state.get("step", -1) >= cfg.train.max_steps


def train(cfg: Config, run_dir: str | Path, resume: bool = False) -> Path | None:
    """Run (or resume) training in run_dir; the same call works under torchrun. Returns the last checkpoint."""
    from gpt2lab.config import to_toml

    run_dir = Path(run_dir)
    latest = ckpt.find_latest(run_dir)
    if not resume and latest is not None and _finished(latest, cfg):
        print(f"{run_dir} is already trained with this config ({latest.name}); nothing to do")
        return latest
    info = init_distributed(None if cfg.train.device == "auto" else cfg.train.device)
    try:
        run = setup(cfg, run_dir, info, resume)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(to_toml(cfg))
            n = run.raw_model.num_params()
            _print0(
                info,
                f"{'resuming at step ' + str(run.start_step) if resume else 'training'} in {run_dir}: "
                f"{n / 1e6:.1f}M parameters, {info.world_size} x {info.device}, grad accumulation {run.grad_accum}, "
                f"{cfg.train.total_batch:,} tokens per step",
            )
        with StopSignals() as stop:
            return loop(run, stop)
    finally:
        destroy_distributed()


def train_command(args: argparse.Namespace) -> int:
    """`gpt2lab train [CONFIG] [--set k=v ...] [--run-dir DIR] [--resume RUN_DIR]`."""
    from gpt2lab.config import build_config, load_config

    if args.resume and args.run_dir:
        raise Gpt2LabError("--resume RUN_DIR continues in RUN_DIR; leave out --run-dir")
    if args.resume:
        latest = ckpt.find_latest(args.resume)
        if latest is None:
            raise Gpt2LabError(f"{args.resume}: no complete checkpoint to resume from (is it a run folder?)")
        if args.config:
            cfg = load_config(args.config, args.set)
        else:
            saved = ckpt.read_json(latest / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY, {}).get("config")
            if not isinstance(saved, dict):
                raise Gpt2LabError(f"{latest}: no training config inside; give the CONFIG file too")
            cfg = build_config(saved, f"{latest / ckpt.CONFIG_NAME}", args.set)
        run_dir = Path(args.resume)
    elif args.config:
        cfg = load_config(args.config, args.set)
        run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    else:
        raise Gpt2LabError("give a CONFIG file (e.g. configs/shakespeare.toml) or --resume RUN_DIR")
    train(cfg, run_dir, resume=bool(args.resume))
    return 0
