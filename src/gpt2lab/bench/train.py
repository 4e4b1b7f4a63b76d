"""`gpt2lab bench train`: the speed of one training step, compile off/on or plain vs optimised.

It times the real step (``gpt2lab.train.train_step``: forward, backward, clipping, AdamW) on
a config's model, micro-batch and precision, over random tokens (so no dataset is needed and
data loading is not part of the figure). The variants: torch.compile off and on (the config's
other [perf] switches kept), or with ``--compare`` the plain path (eager, plain logits + loss,
default attention) against the config's [perf] settings. Each variant gets a fresh model, untimed warmup steps
(compilation happens there), then ``--steps`` timed steps. Reported: median ms/step, tokens/s, MFU
(against the GPU's bf16 peak; omitted when unknown, e.g. on CPU), and peak memory (CUDA: the
allocator's peak; CPU: the process's peak resident set, which only grows across variants).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from gpt2lab.errors import Gpt2LabError


class RandomBatches:
    """A loader stand-in: the same random (x, y) batch every time, already on the device."""

    def __init__(self, batch: int, seq_len: int, vocab: int, device: str):
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        self.x, self.y = data[:, :-1].to(device), data[:, 1:].to(device)  # (B, T) each

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def _peak_memory(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss is KiB on Linux


def bench_variant(cfg, label: str, perf, steps: int, warmup: int, grad_accum: int, device: str) -> dict:
    """Time ``steps`` optimizer steps of one variant (a PerfConfig); return its row."""
    from gpt2lab.model import GPT
    from gpt2lab.optim import lr_at, make_optimizer, set_lr
    from gpt2lab.perf import prepare_model, step_context
    from gpt2lab.train import peak_flops, precision, train_step

    device_type = torch.device(device).type
    dtype = precision(cfg.train.dtype, device_type)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.train.seed)
    raw = GPT(cfg.model).to(device)
    model = prepare_model(raw, perf, device_type)
    optimizer = make_optimizer(raw, cfg.optim, device_type)
    batches = RandomBatches(cfg.train.micro_batch, cfg.model.block_size, cfg.model.vocab_size, device)
    autocast = step_context(device_type, dtype)

    times, losses = [], []
    for step in range(warmup + steps):
        set_lr(optimizer, lr_at(step, cfg.optim))
        t0 = time.perf_counter()
        loss, _, _ = train_step(model, raw, optimizer, batches, grad_accum, autocast=autocast, grad_clip=1.0)
        if step >= warmup:  # train_step ends with a host read, so the step is complete here
            times.append(time.perf_counter() - t0)
        losses.append(loss)
        print(f"  {label} step {step + 1}/{warmup + steps}: "
              f"{(time.perf_counter() - t0) * 1e3:.0f} ms, loss {loss:.3f}", file=sys.stderr, flush=True)  # fmt: skip
    ms = 1e3 * statistics.median(times)  # the median: robust to a step slowed by other work
    tokens = cfg.train.micro_batch * cfg.model.block_size * grad_accum
    peak = peak_flops(device)
    tps = tokens / (ms / 1e3)
    return {
        "variant": label,
        "ms/step": f"{ms:.1f}",
        "tokens/s": f"{tps:,.0f}",
        "MFU": f"{raw.flops_per_token(cfg.model.block_size) * tps / peak:.1%}" if peak else "n/a",
        "peak memory": _peak_memory(device),
        "final loss": f"{losses[-1]:.3f}",
    }


def bench_train_command(args: argparse.Namespace) -> int:
    from gpt2lab.config import load_config
    from gpt2lab.dist import default_device

    cfg = load_config(args.config, args.set)
    if args.steps < 1 or args.warmup < 0 or args.grad_accum < 1:
        raise Gpt2LabError("--steps and --grad-accum must be >= 1, --warmup >= 0")
    device = default_device() if cfg.train.device == "auto" else cfg.train.device
    variants = _variants(cfg.perf, args.compare, args.compile)
    tokens = cfg.train.micro_batch * cfg.model.block_size * args.grad_accum
    n_params = _shape_only(cfg).num_params(non_embedding=False) / 1e6
    print(
        f"bench train: {args.config} ({n_params:.0f}M parameters), B={cfg.train.micro_batch} T={cfg.model.block_size} "
        f"x {args.grad_accum} micro-steps = {tokens:,} tokens/step, {device}, torch {torch.__version__}, "
        f"{args.warmup} warmup + {args.steps} timed steps"
    )
    rows = []
    for label, perf in variants:
        try:
            rows.append(bench_variant(cfg, label, perf, args.steps, args.warmup, args.grad_accum, device))
        except torch.cuda.OutOfMemoryError:
            raise Gpt2LabError(
                f"CUDA out of memory at train.micro_batch={cfg.train.micro_batch}; lower it with --set"
            ) from None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    headers = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in headers]
    print(" | ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(r[h].rjust(w) for h, w in zip(headers, widths)))
    if len(rows) == 2:
        first, second = (float(r["ms/step"]) for r in rows)
        print(f"{rows[1]['variant']} vs {rows[0]['variant']}: {first / second:.2f}x faster")
    return 0


def _variants(perf, compare: bool, compile_choice: str) -> list[tuple[str, object]]:
    """(label, PerfConfig) of each variant to time."""
    from dataclasses import replace

    from gpt2lab.perf import PerfConfig

    if compare:
        return [("plain", PerfConfig(compile=False)), ("optimised", perf)]
    both = [("compile off", replace(perf, compile=False)), ("compile on", replace(perf, compile=True))]
    return {"both": both, "off": both[:1], "on": both[1:]}[compile_choice]


def _shape_only(cfg):
    """The model on the meta device: its parameter count without allocating it."""
    from gpt2lab.model import GPT

    with torch.device("meta"):
        return GPT(cfg.model)
