"""What this machine can do, decided in one place: device, precision, kernels, memory.

Every code path that differs by hardware asks here (``capabilities``) instead of testing
``device == "cuda"``: bf16 or fp16 with a gradient scaler, fused AdamW, pinned memory,
torch.compile, the SDPA kernels, NCCL. ``preflight`` checks a run's settings against the
device before anything is built or written: an impossible setting is one ``Gpt2LabError``;
a setting the machine cannot honour but can do without (compile without a compiler, a
flash kernel the GPU lacks, NCCL missing) falls back, with one notice line the caller
prints. It also refuses a run whose memory estimate exceeds what the device has, and
resolves ``train.micro_batch = "auto"``.
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.config import GPTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_KERNELS = ("cudnn", "efficient")  # SDPA kernels that exist on CUDA only (flash has a CPU version too)
_CUDA_SLACK = 1.5  # compiled CUDA steps use less than the eager estimate: refuse only far beyond free memory
_OVERHEAD = 128 * 2**20  # kernels' workspaces and libraries loaded at the first step (measured on CPU)
_AUTO_FRACTION = 0.7  # micro_batch auto on the CPU: leave room for the OS, the loader and other processes


class _PerfSettings(Protocol):
    compile: bool | None
    attn_backend: str
    ce_chunk_size: int
    activation_checkpointing: bool


class _RunConfig(Protocol):
    """What preflight reads of a gpt2lab.config.Config."""

    model: GPTConfig
    train: object
    optim: object
    perf: _PerfSettings


# ----------------------------------------------------------------------------- device and capabilities


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> str:
    """The device to run on: "auto" = cuda if present, then mps, else cpu; an error if the named one is absent."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None and torch.version.hip is None else "no GPU visible"
        raise Gpt2LabError(f"device {name!r}: no CUDA GPU is available (torch {torch.__version__}: {build})")
    if kind == "mps" and not mps_available():
        raise Gpt2LabError(f"device {name!r}: Apple's MPS backend is not available on this machine")
    if kind not in ("cpu", "cuda", "mps"):
        raise Gpt2LabError(f"device {name!r}: expected auto, cpu, cuda[:N] or mps")
    return name


@dataclass(frozen=True)
class Capabilities:
    """What one device supports; ``compile`` is None when torch.compile can work, else the reason it cannot."""

    device_type: str  # cuda, mps or cpu
    name: str  # e.g. "NVIDIA H100 80GB HBM3", "cpu"
    bf16: bool  # bfloat16 autocast in hardware (V100/T4: emulated only, so False)
    fp16: bool  # float16 autocast worth using
    grad_scaler: bool  # torch.amp.GradScaler runs here
    fused_adamw: bool  # AdamW's fused kernel
    pin_memory: bool  # page-locked host buffers speed up host-to-device copies
    tf32: bool  # TF32 matmuls (Ampere and later)
    nccl: bool  # NCCL for multi-GPU all-reduce
    cc_major: int = 0  # CUDA compute capability (major); 0 elsewhere

    @functools.cached_property
    def compile(self) -> str | None:
        """None when torch.compile can work here, else why not (looked up only when compiling is wanted)."""
        return _compile_problem(self.device_type, self.cc_major)


def _cpp_compiler_problem() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return None
    except ImportError:  # a private module that may move: fall back to a look at PATH
        found = any(shutil.which(c) for c in ("g++", "clang++", "c++", "cl"))
        return None if found else "no C++ compiler (g++ or clang++) for its CPU backend"
    except Exception:  # InvalidCxxCompiler and friends
        return "no working C++ compiler (g++ or clang++) for its CPU backend"


@functools.cache
def _compile_problem(device_type: str, major: int) -> str | None:
    """Why torch.compile cannot work for this device type, or None."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "TorchDynamo does not support this Python version/platform"
    except Exception as e:
        return f"TorchDynamo is unavailable ({e})"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if major and major < 7:
            return "Triton needs a GPU of compute capability 7.0 or newer"
        return None if has_triton() else "Triton is not installed"
    if device_type == "cpu":
        return _cpp_compiler_problem()
    return None  # mps: Inductor's Metal backend; only used when asked


@functools.cache
def capabilities(device: str | torch.device) -> Capabilities:
    """What ``device`` can do (cached per device)."""
    dev = torch.device(device)
    kind = dev.type
    if kind == "cuda":
        major, _ = torch.cuda.get_device_capability(dev)
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return Capabilities(
            "cuda", torch.cuda.get_device_name(dev), bf16=bf16, fp16=major >= 6, grad_scaler=True, fused_adamw=True,
            pin_memory=True, tf32=major >= 8, nccl=torch.distributed.is_nccl_available(), cc_major=major,
        )  # fmt: skip
    if kind == "mps":
        return Capabilities(
            "mps", "Apple MPS", bf16=_autocast_works("mps", torch.bfloat16), fp16=_autocast_works("mps", torch.float16),
            grad_scaler=False, fused_adamw=False, pin_memory=False, tf32=False, nccl=False,
        )  # fmt: skip
    return Capabilities(
        "cpu", "cpu", bf16=True, fp16=True, grad_scaler=True, fused_adamw=False, pin_memory=False, tf32=False,
        nccl=False,
    )  # fmt: skip


@functools.cache
def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """True if a matmul under autocast to dtype runs on this device type (MPS: depends on the macOS version)."""
    try:
        with warnings.catch_warnings(), torch.autocast(device_type=device_type, dtype=dtype):
            warnings.simplefilter("ignore")
            a = torch.ones(8, 8, device=device_type)
            return (a @ a).dtype == dtype
    except (RuntimeError, TypeError):
        return False


def pin_memory(device: str | torch.device) -> bool:
    """Whether batches for this device should go through pinned host memory."""
    return capabilities(str(device)).pin_memory


def dist_backend(device: str) -> str:
    """The process-group backend: NCCL on GPUs that have it, else gloo (which also moves CUDA tensors)."""
    caps = capabilities(device)
    return "nccl" if caps.device_type == "cuda" and caps.nccl else "gloo"


# ----------------------------------------------------------------------------- precision and kernels


def autocast_dtype(name: str, caps: Capabilities) -> torch.dtype:
    """train.dtype as a torch dtype; "auto" = bfloat16 where the GPU has it, else float16 (scaled), else float32."""
    if name != "auto":
        return DTYPES[name]
    if caps.device_type == "cuda":
        return torch.bfloat16 if caps.bf16 else torch.float16 if caps.fp16 else torch.float32
    if caps.device_type == "mps":  # no gradient scaler on MPS: float16 only when asked
        return torch.bfloat16 if caps.bf16 else torch.float32
    return torch.float32  # CPU: bf16 autocast is slower than float32 on most CPUs


def needs_grad_scaler(dtype: torch.dtype, caps: Capabilities) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 and float32 need none."""
    return dtype == torch.float16 and caps.grad_scaler


def _compile_wanted(perf: _PerfSettings, caps: Capabilities) -> bool:
    """perf.compile as asked: explicitly, or auto = on for CUDA."""
    return bool(perf.compile if perf.compile is not None else caps.device_type == "cuda")


def use_compile(perf: _PerfSettings, caps: Capabilities) -> bool:
    """perf.compile as decided here: as wanted, but off wherever torch.compile cannot work."""
    return _compile_wanted(perf, caps) and caps.compile is None


@functools.cache
def attention_available(backend: str, device: str, dtype: torch.dtype, head_dim: int) -> bool:
    """True if the SDPA kernel runs forward and backward here, for this dtype and head size (a tiny probe)."""
    if backend == "auto":
        return True
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]  # fmt: skip
    q = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with warnings.catch_warnings(), sdpa_kernel(kernel):
            warnings.simplefilter("ignore")  # torch explains each rejected kernel in a warning
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        return True
    except RuntimeError:
        return False


def attention_backend(perf: _PerfSettings, device: str, dtype: torch.dtype, head_dim: int) -> str:
    """perf.attn_backend, or "auto" where this GPU lacks that kernel (preflight has said so)."""
    name = perf.attn_backend
    if name == "auto" or capabilities(device).device_type != "cuda":
        return name
    return name if attention_available(name, device, dtype, head_dim) else "auto"


# ----------------------------------------------------------------------------- memory


def _param_count(m: GPTConfig) -> int:
    """Parameters of the network this config builds (on the meta device: no memory, any variant)."""
    from gpt2lab.model.gpt import GPT

    with torch.device("meta"):
        return sum(p.numel() for p in GPT(m).parameters())


def estimate_train_bytes(
    model: GPTConfig, micro_batch: int, seq_len: int, dtype: torch.dtype, perf: _PerfSettings
) -> int:
    """Memory of one eager training step: weights, grads, AdamW state, activations, logits (bytes).

    Calibrated against the peak resident memory of real CPU steps (tests/runtime/test_hardware.py).
    """
    n = _param_count(model)
    C, L, V, Vp = model.n_embd, model.n_layer, model.vocab_size, model.embedding_rows
    tokens = micro_batch * seq_len
    half = dtype in (torch.bfloat16, torch.float16)
    states = 20 * n  # fp32 weights, grads, AdamW's two moments, and the step's temporaries
    # per token and layer: ~17 C values kept for the backward (qkv, attention out, 4C MLP twice, norms),
    # in the autocast dtype, plus the float32 residual stream and LayerNorm outputs
    per_layer = tokens * (17 * C * (2 if half else 4) + (6 * C * 4 if half else 0))
    if perf.attn_backend == "math":  # the (T, T) attention probabilities are materialised
        per_layer += 3 * micro_batch * model.n_head * seq_len * seq_len * 4
    if perf.activation_checkpointing:  # block inputs only, plus one block recomputed in the backward
        activations = L * tokens * C * 4 + per_layer
    else:
        activations = L * per_layer
    if perf.ce_chunk_size:  # fused LM head + loss: chunk logits, grad of the hidden states and of the head
        chunk = min(perf.ce_chunk_size, tokens)
        logits = 3 * chunk * Vp * 4 + 2 * tokens * C * 4 + Vp * C * 4
    else:  # (B, T, V) logits, their float32 copy, log-softmax and its gradient
        logits = tokens * (Vp * (2 if half else 4) + 3 * V * 4)
    return int(_OVERHEAD + states + activations + logits)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cpu_available_bytes() -> int | None:
    """MemAvailable, or what is left under the cgroup's memory limit if that is lower."""
    candidates = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        kb = next(int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:"))
        candidates.append(kb * 1024)
    except (OSError, StopIteration, ValueError):
        try:
            import psutil

            candidates.append(int(psutil.virtual_memory().available))
        except ImportError:
            pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2 ("max" = none)
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        lim, used = _read_int(limit), _read_int(usage)
        if lim is not None and used is not None and lim < 1 << 60:
            candidates.append(max(0, lim - used))
    return min(candidates) if candidates else None


def available_bytes(device: str) -> int | None:
    """Memory a run on this device can still take (None when unknown)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if kind == "mps":  # unified memory: Metal's recommended working set, less what is already allocated
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        except (AttributeError, RuntimeError):
            return _cpu_available_bytes()
    return _cpu_available_bytes()


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ----------------------------------------------------------------------------- micro_batch auto


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _rows_per_rank(cfg: _RunConfig, world_size: int) -> int:
    per = cfg.model.block_size * world_size
    if cfg.train.total_batch % per:
        raise Gpt2LabError(
            f"train.total_batch ({cfg.train.total_batch}) is not divisible by model.block_size x world size "
            f"({cfg.model.block_size} x {world_size} = {per}), so no micro-batch size can keep it"
        )
    return cfg.train.total_batch // per


def _step_fits(cfg: _RunConfig, device: str, micro_batch: int, dtype: torch.dtype) -> bool:
    """Run forward + backward + AdamW at this micro-batch on the GPU; False on out-of-memory."""
    from gpt2lab.model.gpt import GPT

    model = opt = x = loss = None
    try:
        model = GPT(cfg.model).to(device)
        model.ce_chunk_size = cfg.perf.ce_chunk_size
        model.activation_checkpointing = cfg.perf.activation_checkpointing
        # AdamW's state is what matters here (two fp32 tensors per parameter), whatever the param groups
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=capabilities(device).fused_adamw or None)
        x = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.model.block_size), device=device)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        torch.cuda.synchronize(device) if torch.device(device).type == "cuda" else torch.mps.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    except RuntimeError as e:  # MPS reports its OOM as a RuntimeError
        if "out of memory" in str(e).lower():
            return False
        raise
    finally:
        del model, opt, x, loss
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        elif torch.device(device).type == "mps":
            torch.mps.empty_cache()


def auto_micro_batch(cfg: _RunConfig, device: str, world_size: int, dtype: torch.dtype) -> tuple[int, str]:
    """The largest micro-batch dividing the step's sequences per rank that fits here, and how it was chosen."""
    rows = _rows_per_rank(cfg, world_size)
    T = cfg.model.block_size
    budget = available_bytes(device)
    if capabilities(device).device_type in ("cuda", "mps"):
        # start where the estimate says it may fit, then probe, halving on out-of-memory
        candidates = [
            b for b in _divisors_desc(rows)
            if budget is None or estimate_train_bytes(cfg.model, b, T, dtype, cfg.perf) <= 2 * budget
        ] or [1]  # fmt: skip
        b = candidates[0]
        while True:
            if _step_fits(cfg, device, b, dtype):
                return b, f"probed on {device} (a forward + backward + AdamW step)"
            smaller = [d for d in candidates if d <= b // 2]
            if not smaller:
                raise Gpt2LabError(
                    f"train.micro_batch=auto: even 1 sequence of {T} tokens does not fit on {device}; "
                    "set perf.activation_checkpointing=true, a perf.ce_chunk_size, or a smaller model.block_size"
                )
            b = smaller[0]
    if budget is None:
        return 1, "memory unknown: the smallest"
    limit = _AUTO_FRACTION * budget
    for b in _divisors_desc(rows):
        if estimate_train_bytes(cfg.model, b, T, dtype, cfg.perf) <= limit:
            return b, f"estimated to fit in {_gib(limit)} of the {_gib(budget)} available"
    return 1, "the smallest"


# ----------------------------------------------------------------------------- preflight


def memory_knobs(cfg: _RunConfig) -> list[str]:
    """The settings besides train.micro_batch that lower a step's memory, for out-of-memory messages."""
    knobs = [] if cfg.perf.ce_chunk_size else ["perf.ce_chunk_size=8192"]
    knobs += [] if cfg.perf.activation_checkpointing else ["perf.activation_checkpointing=true"]
    return [*knobs, f"model.block_size (now {cfg.model.block_size})"]


def _check_memory(cfg: _RunConfig, device: str, dtype: torch.dtype, models: int = 1, world_size: int = 1) -> None:
    budget = available_bytes(device)
    if budget is None:
        return
    caps = capabilities(device)
    need = estimate_train_bytes(cfg.model, cfg.train.micro_batch, cfg.model.block_size, dtype, cfg.perf)
    if getattr(cfg.train, "parallel", "ddp") == "fsdp":  # weights, grads and AdamW state: 1/world_size per rank
        need -= 20 * _param_count(cfg.model) * (world_size - 1) // world_size
    need += (models - 1) * 16 * _param_count(cfg.model)  # each other model held: weights, grads, AdamW moments
    if need <= budget * (_CUDA_SLACK if caps.device_type == "cuda" else 1.0):
        return
    fixes = [f"train.micro_batch (now {cfg.train.micro_batch}; or auto)", *memory_knobs(cfg)]
    raise Gpt2LabError(
        f"this run needs about {_gib(need)} of memory per step and {device} has {_gib(budget)} available; "
        f"lower it with --set: {', '.join(fixes)}"
    )


def _precision_notices(name: str, dtype: torch.dtype, caps: Capabilities) -> list[str]:
    notes = []
    if caps.device_type == "cuda" and dtype == torch.bfloat16 and not caps.bf16:
        notes.append(f"train.dtype=bfloat16: {caps.name} has no native bfloat16 (emulated, slow); auto picks float16")
    if dtype == torch.float16 and not caps.grad_scaler:
        notes.append(f"train.dtype=float16 on {caps.device_type}: no gradient scaler here; small gradients may vanish")
    if name == "auto" and dtype == torch.float16:
        notes.append(f"train.dtype=auto: {caps.name} has no bfloat16; float16 autocast with a gradient scaler")
    supported = caps.bf16 if dtype == torch.bfloat16 else caps.fp16
    if caps.device_type == "mps" and dtype != torch.float32 and not supported:
        raise Gpt2LabError(f"train.dtype={name}: torch's MPS autocast does not support {dtype} here; use float32")
    return notes


def _kernel_notices(cfg: _RunConfig, device: str, dtype: torch.dtype, caps: Capabilities) -> list[str]:
    notes = []
    perf = cfg.perf
    # caps.compile is looked up only when compiling is wanted: the check imports TorchDynamo
    if _compile_wanted(perf, caps) and caps.compile is not None:
        notes.append(f"perf.compile: torch.compile cannot run here ({caps.compile}); running eager")
    name = perf.attn_backend
    head_dim = cfg.model.head_size
    if name != "auto" and not attention_available(name, device, dtype, head_dim):
        if caps.device_type != "cuda":
            gpu_only = name in GPU_KERNELS or caps.device_type == "mps"
            why = "is a CUDA kernel" if gpu_only else f"does not run here with {dtype}"
            raise Gpt2LabError(f"perf.attn_backend={name} {why} and this run is on {device}; use auto (or math)")
        notes.append(
            f"perf.attn_backend={name}: not available on {caps.name} with {str(dtype)[6:]} and head size {head_dim}; "
            "PyTorch picks the kernel (auto)"
        )
    return notes


def print_notices(notes: list[str]) -> None:
    """Each notice once, on its own line on stderr, from rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)


def preflight(cfg: _RunConfig, device: str, world_size: int = 1, models: int = 1) -> list[str]:
    """Check the run's settings against this device before any work; return the fallback notices to print.

    Raises one Gpt2LabError for what cannot run here. Resolves ``train.micro_batch = "auto"``
    in ``cfg`` (the only setting it changes), so that the resolved value is saved with the run.
    ``models``: how many models (with their optimizer state) live at once, e.g. the variants of a benchmark.
    """
    caps = capabilities(device)
    dtype = autocast_dtype(cfg.train.dtype, caps)
    notes = _precision_notices(cfg.train.dtype, dtype, caps)
    notes += _kernel_notices(cfg, device, dtype, caps)
    if world_size > 1 and caps.device_type == "cuda" and not caps.nccl:
        notes.append("NCCL is not available here (Windows?): gloo all-reduces the gradients, more slowly")
    if cfg.train.micro_batch is None:
        b, how = auto_micro_batch(cfg, device, world_size, dtype)
        cfg.train.micro_batch = b
        accum = _rows_per_rank(cfg, world_size) // b
        notes.append(f"train.micro_batch=auto: {b} ({how}); gradient accumulation {accum}")
    _check_memory(cfg, device, dtype, models, world_size)
    return notes
