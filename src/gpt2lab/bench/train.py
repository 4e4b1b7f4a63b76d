"""`gpt2lab bench train`: the speed of one training step, compile off/on or plain vs optimised.

It times the real step (``gpt2lab.train.loop.train_step``: forward, backward, clipping, AdamW) on
a config's model, micro-batch and precision, over random tokens (so no dataset is needed and
data loading is not part of the figure). The variants: torch.compile off and on (the config's
other [perf] switches kept), or with ``--compare`` the plain path (eager, plain logits + loss,
default attention) against the config's [perf] settings.

The method, so that a ratio can be trusted on a shared machine: every variant gets its own fresh
model (same seed), then ``--warmup`` untimed steps each (compilation happens there), taken in turn
(A, B, A, B, ...) so that the process's own warm-up (allocator, thread pool, page faults) is shared.
The timed steps then run in rounds, a few steps of each variant per round, the order reversed every
other round (A B, B A, A B, ...) so that a drift in the machine's speed hits both alike. Each round
gives one ratio (the same round's mean step times); the report is the median ratio with a
distribution-free confidence interval of that median (order statistics of the per-round ratios),
and "no measurable difference" when the interval covers 1.00. The default of 3 warm-up steps comes
from measurements on a shared 2-core CPU: a process's first step took 1.2-2.6x a steady step, a
variant's first up to 1.8x and its second up to 2.2x, the third was within the noise (and with
torch.compile the first step compiles); with 1 warm-up step and one variant after the other, an A/A
comparison read anything from 0.68x to 1.45x.
Reported per variant: median ms/step over rounds, tokens/s, MFU (against the GPU's bf16 peak;
n/a when unknown, e.g. on CPU), and peak memory (CUDA: the variant's own tensors plus its step's
peak; CPU: the process's peak resident set, shared by all variants).
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2lab.bench.stats import ratio
from gpt2lab.errors import Gpt2LabError

MAX_ROUNDS = 10  # --steps are spread over at most this many rounds per variant


class RandomBatches:
    """A loader stand-in: the same random (x, y) batch every time, already on the device."""

    def __init__(self, batch: int, seq_len: int, vocab: int, device: str):
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        self.x, self.y = data[:, :-1].to(device), data[:, 1:].to(device)  # (B, T) each

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


@dataclass
class Variant:
    """One variant's model, optimizer and batch, stepped one optimizer step at a time."""

    label: str
    cfg: object  # the Config, with this variant's [perf]
    device: str
    grad_accum: int = 1
    losses: list[float] = field(default_factory=list)
    peak_extra: int = 0  # CUDA: the largest allocation growth within one of its steps, bytes

    def __post_init__(self) -> None:
        from gpt2lab.model.gpt import GPT
        from gpt2lab.runtime.hardware import attention_backend
        from gpt2lab.train.optim import make_optimizer
        from gpt2lab.train.perf import prepare_model, step_context
        from gpt2lab.train.run import precision

        cfg, device_type = self.cfg, torch.device(self.device).type
        dtype = precision(cfg.train.dtype, device_type)
        torch.manual_seed(cfg.train.seed)  # the same weights in every variant
        self.raw = GPT(cfg.model).to(self.device)
        self.model = prepare_model(self.raw, cfg.perf, device_type, dtype)
        self.optimizer = make_optimizer(self.raw, cfg.optim, device_type)
        self.batches = RandomBatches(cfg.train.micro_batch, cfg.model.block_size, cfg.model.vocab_size, self.device)
        self.autocast = step_context(device_type, dtype)
        # the kernel prepare_model chose (auto where this GPU lacks the one asked for), set again before each step
        self.attn_backend = attention_backend(cfg.perf, self.device, dtype, cfg.model.head_size)

    def step(self) -> float:
        """One optimizer step; its wall seconds."""
        from gpt2lab.train.loop import train_step
        from gpt2lab.train.optim import apply_schedule
        from gpt2lab.train.perf import set_attention_backend

        set_attention_backend(self.attn_backend)  # process-wide: the variants may differ
        apply_schedule(self.optimizer, len(self.losses), self.cfg.optim)
        cuda = self.device.startswith("cuda")
        if cuda:
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        loss, _, _ = train_step(self.model, self.raw, self.optimizer, self.batches, self.grad_accum,
                                autocast=self.autocast, grad_clip=1.0)  # fmt: skip
        seconds = time.perf_counter() - t0  # train_step ends with a host read: the step is complete here
        if cuda:
            self.peak_extra = max(self.peak_extra, torch.cuda.max_memory_allocated(self.device) - base)
        self.losses.append(loss)
        return seconds

    def own_bytes(self) -> int:
        """Bytes of the tensors this variant keeps between steps: parameters and optimizer state."""
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in [*self.raw.parameters(), *state])


def interleave(steps: list[Callable[[], float]], warmup: int, rounds: int, per_round: int,
               progress: Callable[[str], None] | None = None) -> list[list[float]]:  # fmt: skip
    """Warm up every variant in turn, then time them in rounds; [variant][round] mean seconds per step.

    The order is reversed every other round (A B, B A, ...) so that a change in the machine's
    speed during the run, and any cost of coming after the other variant, falls on both alike.
    """
    for i in range(warmup):
        for v, step in enumerate(steps):
            seconds = step()
            if progress:
                progress(f"warm-up {i + 1}/{warmup} variant {v + 1}: {seconds * 1e3:.0f} ms")
    times: list[list[float]] = [[] for _ in steps]
    for r in range(rounds):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for v in order:
            times[v].append(sum(steps[v]() for _ in range(per_round)) / per_round)
            if progress:
                progress(f"round {r + 1}/{rounds} variant {v + 1}: {times[v][-1] * 1e3:.0f} ms/step")
    return times


def _peak_memory(variant: Variant) -> str:
    if variant.device.startswith("cuda"):
        return f"{(variant.own_bytes() + variant.peak_extra) / 2**30:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    return f"{rss:.2f} GiB RSS*"


def _row(variant: Variant, times: list[float]) -> dict[str, str]:
    from gpt2lab.train.loop import peak_flops

    cfg = variant.cfg
    seconds = statistics.median(times)  # the median round: robust to a round slowed by other work
    tps = cfg.train.micro_batch * cfg.model.block_size * variant.grad_accum / seconds
    peak = peak_flops(variant.device)
    return {
        "variant": variant.label,
        "ms/step": f"{seconds * 1e3:.1f}",
        "tokens/s": f"{tps:,.0f}",
        "MFU": f"{variant.raw.flops_per_token(cfg.model.block_size) * tps / peak:.1%}" if peak else "n/a",
        "peak memory": _peak_memory(variant),
        "final loss": f"{variant.losses[-1]:.3f}",
        "rounds' ms/step": f"{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}",  # the spread behind the median
    }


def _print_table(rows: list[dict[str, str]]) -> None:
    headers = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in headers]
    print(" | ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(r[h].rjust(w) for h, w in zip(headers, widths)))


def bench_train_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gpt2lab.config import load_config
    from gpt2lab.runtime.dist import default_device

    cfg = load_config(args.config, args.set)
    if args.steps < 1 or args.warmup < 0 or args.grad_accum < 1:
        raise Gpt2LabError("--steps and --grad-accum must be >= 1, --warmup >= 0")
    device = default_device() if cfg.train.device == "auto" else cfg.train.device
    from gpt2lab.runtime.hardware import preflight, print_notices

    timed = replace(cfg, perf=replace(cfg.perf, compile=True)) if not args.compare and args.compile != "off" else cfg
    chosen = _variants(cfg.perf, args.compare, args.compile)
    # before any model: one error line or fallback notices; micro_batch auto resolved; every variant held at once
    print_notices(preflight(timed, device, models=len(chosen)))
    rounds = min(args.steps, MAX_ROUNDS)
    per_round = math.ceil(args.steps / rounds)
    try:
        variants = [Variant(label, replace(cfg, perf=perf), device, args.grad_accum) for label, perf in chosen]
        print(_header(args, variants[0], rounds, per_round), flush=True)
        times = interleave([v.step for v in variants], args.warmup, rounds, per_round,
                           lambda line: print(f"  {line}", file=sys.stderr, flush=True))  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        raise Gpt2LabError(
            f"CUDA out of memory at train.micro_batch={cfg.train.micro_batch} with {len(chosen)} variants held at "
            "once; lower train.micro_batch with --set, or time one variant (--compile on or off)"
        ) from None
    _print_table([_row(v, t) for v, t in zip(variants, times)])
    if not device.startswith("cuda"):
        print("* the process's peak resident set: all variants live in one process, so it is shared")
    if len(variants) == 2:
        print(ratio(times[0], times[1]).describe(variants[0].label, variants[1].label))
    return 0


def _header(args: argparse.Namespace, first: Variant, rounds: int, per_round: int) -> str:
    cfg = first.cfg
    tokens = cfg.train.micro_batch * cfg.model.block_size * args.grad_accum
    return (
        f"bench train: {args.config} ({first.raw.num_params(non_embedding=False) / 1e6:.0f}M parameters), "
        f"B={cfg.train.micro_batch} T={cfg.model.block_size} x {args.grad_accum} micro-steps = {tokens:,} "
        f"tokens/step, {first.device}, torch {torch.__version__}, {args.warmup} warmup + {rounds} rounds x "
        f"{per_round} timed steps, variants interleaved"
    )


def _variants(perf, compare: bool, compile_choice: str) -> list[tuple[str, object]]:
    """(label, PerfConfig) of each variant to time."""
    from dataclasses import replace

    from gpt2lab.train.perf import PerfConfig

    if compare:
        return [("plain", PerfConfig(compile=False)), ("optimised", perf)]
    both = [("compile off", replace(perf, compile=False)), ("compile on", replace(perf, compile=True))]
    return {"both": both, "off": both[:1], "on": both[1:]}[compile_choice]
