"""Speed switches of a training step, and the one place that applies them.

Each switch computes the same function as the plain path (tests/train/test_perf.py checks loss
and gradients); they trade memory, compile time and kernels, not results:
- ``compile``: torch.compile the model (``compile_mode``, ``fullgraph``);
- ``attn_backend``: which scaled-dot-product-attention kernel (flash, cuDNN, efficient, math);
- ``ce_chunk_size``: the fused LM head + cross-entropy of ``gpt2lab.model.ops`` (no B*T*V logits);
- ``activation_checkpointing``: recompute each block in the backward pass instead of
  storing its activations (about a third more compute for far less memory: gpt2-xl on one GPU).
Only the training step uses them: evaluation and sampling run the raw, uncompiled model, so
they never trigger a recompilation of the training graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt2lab.model.gpt import GPT
from gpt2lab.runtime import hardware

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTN_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


@dataclass
class PerfConfig:
    """The [perf] section: how fast a training step runs (never what it computes)."""

    compile: bool | None = None  # torch.compile the model; auto (None) = on for CUDA (with Triton), off elsewhere
    compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead, max-autotune, ...
    fullgraph: bool = False  # fail on a graph break instead of falling back to eager for that part
    attn_backend: str = "auto"  # SDPA kernel: auto (PyTorch picks), flash, cudnn, efficient, math
    ce_chunk_size: int = 0  # rows per chunk of the fused LM head + cross-entropy; 0 = plain logits + loss
    activation_checkpointing: bool = False  # recompute blocks in the backward pass to save memory

    def validate(self) -> list[str]:
        problems = []
        if self.compile_mode not in COMPILE_MODES:
            problems.append(f"perf.compile_mode must be one of {', '.join(COMPILE_MODES)} (got {self.compile_mode!r})")
        if self.attn_backend not in ATTN_BACKENDS:
            problems.append(f"perf.attn_backend must be one of {', '.join(ATTN_BACKENDS)} (got {self.attn_backend!r})")
        if self.ce_chunk_size < 0:
            problems.append(f"perf.ce_chunk_size must be >= 0 (got {self.ce_chunk_size})")
        return problems


def prepare_model(raw_model: GPT, cfg: PerfConfig, device: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Set the model's loss/recompute switches and the attention kernel; return what the step runs.

    ``device`` may be a device ("cuda:1") or its type ("cuda"); ``dtype`` is the autocast dtype (default:
    what train.dtype=auto picks here), for the check that a forced attention kernel runs on this GPU.
    """
    raw_model.ce_chunk_size = cfg.ce_chunk_size
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    caps = hardware.capabilities(device)
    dtype = dtype or hardware.autocast_dtype("auto", caps)
    set_attention_backend(hardware.attention_backend(cfg, device, dtype, raw_model.config.head_size))
    if hardware.use_compile(cfg, caps):
        return torch.compile(raw_model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                             fullgraph=cfg.fullgraph)  # fmt: skip
    return raw_model


def set_attention_backend(name: str) -> None:
    """Allow only the named SDPA kernel (or all of them for "auto"), process-wide.

    A process-wide switch rather than a ``sdpa_kernel`` context: activation checkpointing
    recomputes blocks in the backward pass, outside any context the forward ran in, and the
    recomputation must pick the same kernel.
    """
    flags = {"flash": False, "efficient": False, "math": False, "cudnn": False}
    flags = {k: True for k in flags} if name == "auto" else flags | {name: True}
    torch.backends.cuda.enable_flash_sdp(flags["flash"])
    torch.backends.cuda.enable_mem_efficient_sdp(flags["efficient"])
    torch.backends.cuda.enable_math_sdp(flags["math"])
    torch.backends.cuda.enable_cudnn_sdp(flags["cudnn"])


def step_context(device_type: str, dtype: torch.dtype) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context each forward runs in: autocast to dtype (off for float32)."""

    def context() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)

    return context
