"""Memory per rank of a short `gpt2lab train` run, for BENCHMARKS.md's DDP vs FSDP comparison.

Run it where `gpt2lab` would go, under torchrun, with train's arguments:

    MALLOC_MMAP_THRESHOLD_=131072 torchrun --standalone --nproc_per_node=2 scripts/fsdp_memory.py \
        train CONFIG --set train.parallel=fsdp

MALLOC_MMAP_THRESHOLD_ makes glibc give every freed block over 128 KiB back to the system, so the
resident set follows the live tensors; with glibc's default (a threshold that grows to 32 MiB) freed
blocks stay resident and the high-water mark mostly measures the allocator's reuse.

After the last step each rank prints its peak resident set (ru_maxrss: the whole process, torch and
Python included) over the training steps (read when the first checkpoint save begins) and over the whole
run (the save included), its resident set right after the imports (the same for any model), and the
bytes of the tensors it holds for the model: parameters, gradients and optimizer state (this rank's
shards under FSDP). On a GPU torch.cuda.max_memory_allocated() would say the same more precisely; the CPU has no
allocator statistics.
"""

from __future__ import annotations

import resource
import sys

import torch

from gpt2lab.cli.main import main
from gpt2lab.train import loop as train

MIB = 2**20
START_RSS = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
_loop, _save = train.loop, train.save
_before_save: list[int] = []


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measured_save(run, step, metrics):
    _before_save.append(_peak_rss())
    return _save(run, step, metrics)


def _bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t  # FSDP: this rank's shard
    return t.numel() * t.element_size()


def measured_loop(run, stop):
    out = _loop(run, stop)
    params = list(run.raw_model.parameters())
    weights = sum(_bytes(p) for p in params)
    grads = sum(_bytes(p.grad) for p in params)
    optim = sum(_bytes(v) for s in run.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    steps = _before_save[0] if _before_save else _peak_rss()
    tensors = f"weights {weights / MIB:,.0f} + grads {grads / MIB:,.0f} + optimizer {optim / MIB:,.0f}"
    print(
        f"rank {run.info.rank} ({run.cfg.train.parallel}): peak RSS {steps / MIB:,.0f} MiB training, "
        f"{_peak_rss() / MIB:,.0f} MiB with the save (after imports {START_RSS / MIB:,.0f} MiB); {tensors} "
        f"= {(weights + grads + optim) / MIB:,.0f} MiB of tensors",
        flush=True,
    )
    return out


if __name__ == "__main__":
    train.loop, train.save = measured_loop, measured_save
    sys.exit(main(sys.argv[1:]))
