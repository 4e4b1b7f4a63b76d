"""FSDP2 sharded training (``train.parallel = "fsdp"``): PyTorch's own ``fully_shard``, on a model built on "meta".

Under DDP every rank holds the whole model, its gradients and the optimizer's moments. FSDP2
(``torch.distributed.fsdp.fully_shard``) keeps 1/world_size of each parameter per rank (a DTensor,
sharded on dim 0); before a module's forward its parameters are all-gathered, after its backward the
gradients are reduce-scattered, so the optimizer only ever sees this rank's shards. Applied in one
place, in a fixed order (as torchtitan does): each transformer block, then the embeddings, then the
final norm + LM head, then the root (which takes the rest: value embeddings, x0 skip, and the tied
table when the embeddings are tied, since one tensor can live in one group only).

The model is built on the meta device (shapes, no memory), sharded, then materialised: each tensor's
initial value is computed whole on the CPU, one tensor at a time, and only this rank's rows are kept,
so the whole model never exists on one device. The values are those of ``GPT(config)`` built eagerly
with the same seed: every in-place init op the constructor and ``GPT.init_weights`` run on a meta
tensor (``uniform_``, ``normal_``, ``fill_``, ``zero_``) is replayed on a real CPU tensor of that shape,
so the seed's random stream advances exactly as in the eager build (``_InitReplay``).

On one process (no torchrun, or one rank) there is nothing to shard: the model is built the same way
and trained as a plain module, and its checkpoints are still DCP ones (gpt2lab.train.dcp).
Nothing this module uses failed on the CPU with gloo (torch 2.13): fully_shard on blocks and on module
lists, reshard_after_forward, the gradient reduce-scatter, clip_grad_norm_ and AdamW (foreach) on
DTensors, DCP save/async_save/load; a bf16 MixedPrecisionPolicy runs there too, but is used on CUDA
only (gpt2lab trains in float32 on CPUs). The one limit found is not the device's: FSDP2 cannot gather
parameters under torch.inference_mode ("Cannot set version_counter for inference tensor"), which
generation uses; ``gathered`` gathers them before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from typing import Protocol

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.runtime import hardware
from gpt2lab.runtime.dist import DistInfo


class _FsdpSettings(Protocol):
    """What this module reads of a gpt2lab.config.Config."""

    model: GPTConfig
    train: object
    optim: object
    eval: object
    perf: object


def config_problems(cfg: _FsdpSettings) -> list[str]:
    """What train.parallel = "fsdp" cannot run with, as messages naming the field (empty if none)."""
    if cfg.train.parallel != "fsdp":
        return []
    problems = []
    if cfg.optim.name == "muon":  # Newton-Schulz needs whole matrices; FSDP holds row shards of them
        problems.append(
            "optim.name=muon does not run under train.parallel=fsdp (Muon orthogonalises whole matrices and FSDP "
            "gives each rank row shards of them); use optim.name=adamw, or train.parallel=ddp"
        )
    if cfg.train.dtype == "float16":
        problems.append("train.dtype=float16 does not run under train.parallel=fsdp (its gradient scaler does not "
                        "handle sharded gradients); use bfloat16 or float32")  # fmt: skip
    if getattr(getattr(cfg, "sft", None), "data", None):  # SFT loads its base weights into a whole model
        problems.append("sft.data needs train.parallel=ddp (fine-tuning under fsdp is not supported yet)")
    if cfg.eval.hellaswag_every:  # each rank evaluates its own share: the sharded model needs all ranks in step
        problems.append("eval.hellaswag_every needs train.parallel=ddp (set it to 0 under fsdp and evaluate the "
                        "checkpoint afterwards: gpt2lab eval hellaswag --model RUN_DIR)")  # fmt: skip
    return problems


# ----------------------------------------------------------------------------- meta build, eager init values


class _InitReplay(TorchDispatchMode):
    """Replays every in-place op on a meta tensor on a real CPU tensor of its shape; keeps this rank's rows
    of a parameter (FSDP shards those, not buffers).

    Only self-contained init ops (``normal_``, ``uniform_``, ``fill_``, ``zero_``: no other tensor read)
    can be replayed; anything else is an error naming the op. The last op on a tensor gives its value.
    """

    def __init__(self, rank: int, world_size: int):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.values: dict[int, torch.Tensor] = {}  # id(meta tensor) -> this rank's rows of its current value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        target = args[0] if args else None
        if isinstance(target, torch.Tensor) and target.is_meta and func._schema.name.endswith("_"):
            others = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor)]
            if others:
                raise Gpt2LabError(f"cannot build this model on the meta device: its init reads a tensor in {func}")
            real = torch.empty(target.shape, dtype=target.dtype)
            func(real, *args[1:], **kwargs)  # the same draws from the same generator as the eager build
            key = id(target)
            if key not in self.values:
                weakref.finalize(target, self.values.pop, key, None)  # a tensor dropped in __init__ frees its rows
            self.values[key] = self._rows(real) if isinstance(target, nn.Parameter) else real  # buffers: whole
        return out

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's dim-0 chunk, as FSDP2 cuts it (torch.chunk; trailing ranks may get none)."""
        if self.world_size == 1 or full.dim() == 0:
            return full
        chunks = torch.chunk(full, self.world_size, dim=0)
        return chunks[self.rank].clone() if self.rank < len(chunks) else full[:0].clone()


def build_on_meta(config: GPTConfig, rank: int = 0, world_size: int = 1) -> tuple[GPT, dict[str, torch.Tensor]]:
    """A GPT on the meta device and, by state-dict name, this rank's rows of its eager initial values (buffers whole).

    Call it where ``GPT(config)`` would be called: it consumes the seed's random stream exactly as that would.
    """
    replay = _InitReplay(rank, world_size)
    with torch.device("meta"), replay:
        model = GPT(config)
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    missing = [name for name, t in tensors if id(t) not in replay.values]
    if missing:
        raise Gpt2LabError(f"cannot build this model on the meta device: no init value for {missing[:3]}")
    return model, {name: replay.values[id(t)] for name, t in tensors}


@torch.no_grad()
def materialize(model: GPT, values: dict[str, torch.Tensor], device: str | torch.device) -> None:
    """Allocate the (sharded) meta model on device and fill each tensor with this rank's rows of its value."""
    model.to_empty(device=device)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        local.copy_(values[name])
    if model.config.tie_embeddings and model.transformer.wte.weight is not model.lm_head.weight:
        model.transformer.wte.weight = model.lm_head.weight  # to_empty on an unsharded model: keep the tie


# ----------------------------------------------------------------------------- sharding


def shard(model: GPT, mesh, *, reshard_after_forward: bool = True, mp_policy=None, separate_head: bool = True) -> GPT:
    """fully_shard per block, then the embeddings, then final norm + LM head (if separate_head), then the root.

    ``separate_head`` is False when the LM head's weight is read outside its forward (tied to the
    embeddings, or the chunked loss of perf.ce_chunk_size): then it stays in the root's group, which is
    unsharded for the whole forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
    for block in model.transformer.h:
        fully_shard(block, **kw)
    tied = model.config.tie_embeddings
    if not tied:
        embeddings = [model.transformer.wte] + ([model.transformer.wpe] if "wpe" in model.transformer else [])
        fully_shard(embeddings, **kw)
    if separate_head and not tied:
        fully_shard([model.transformer.ln_f, model.lm_head], **kw)
    fully_shard(model, **kw)
    return model


def mixed_precision(dtype: torch.dtype, device: str):
    """bf16 parameters with fp32 gradient reduction on CUDA; None elsewhere (float32 throughout)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if hardware.capabilities(device).device_type != "cuda" or dtype != torch.bfloat16:
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def build_model(cfg: _FsdpSettings, info: DistInfo, dtype: torch.dtype) -> GPT:
    """The run's model for train.parallel = "fsdp": meta-built, compiled per block (if on), sharded, materialised."""
    if dtype == torch.float16:
        raise Gpt2LabError("train.parallel=fsdp needs bfloat16 or float32; this GPU would train in float16 "
                           "(set train.dtype=float32, or use train.parallel=ddp)")  # fmt: skip
    quiet_view_warning()
    model, values = build_on_meta(cfg.model, info.rank, info.world_size)
    caps = hardware.capabilities(info.device)
    if hardware.use_compile(cfg.perf, caps):  # per block, before sharding (torchtitan's order)
        mode = None if cfg.perf.compile_mode == "default" else cfg.perf.compile_mode
        for block in model.transformer.h:
            block.compile(mode=mode, fullgraph=cfg.perf.fullgraph)
    if info.is_distributed:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(caps.device_type, (info.world_size,))
        shard(
            model, mesh, reshard_after_forward=cfg.train.reshard_after_forward,
            mp_policy=mixed_precision(dtype, info.device), separate_head=cfg.perf.ce_chunk_size == 0,
        )  # fmt: skip
    materialize(model, values, info.device)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module, reshard_after_forward: bool = True):
    """Within: the whole weights on every rank (nothing for an unsharded model).

    For sampling: generation runs under torch.inference_mode, where FSDP2 cannot gather parameters at
    each forward; gathered once before, they stay until the end. Every rank must enter it (a collective).
    """
    from torch.distributed.fsdp import FSDPModule

    parts = [m for m in model.modules() if isinstance(m, FSDPModule)] if is_sharded(model) else []
    for part in parts:
        part.set_reshard_after_forward(False, recurse=False)
        part.unshard()
    try:
        yield
    finally:
        for part in parts:
            part.reshard()
            if part is not model:  # the root never reshards after forward
                part.set_reshard_after_forward(reshard_after_forward, recurse=False)


def perf_without_compile(perf):
    """[perf] as prepare_model should see it under fsdp: the blocks are already compiled (build_model)."""
    return dataclasses.replace(perf, compile=False)


def is_sharded(model: nn.Module) -> bool:
    """True if fully_shard was applied to the model (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def quiet_view_warning() -> None:
    """FSDP2 warns that GPT.forward returns a view (the logits sliced to vocab_size); nothing writes to it in place."""
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
