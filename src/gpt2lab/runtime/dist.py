"""The distributed context: one helper tells every module who and where it is.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) it starts the process group, NCCL on
GPUs that have it and gloo elsewhere; without torchrun it is one process of rank 0.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2lab.runtime.hardware import dist_backend, resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def default_device() -> str:
    """cuda if present, then mps, else cpu (gpt2lab.runtime.hardware decides)."""
    return resolve_device("auto")


def init_distributed(device: str | None = None) -> DistInfo:
    """Start the process group under torchrun (once); return this process's place in it."""
    if "RANK" not in os.environ:
        return DistInfo(0, 0, 1, device or default_device())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = device or default_device()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torch.distributed.nn binds group.WORLD into default arguments when it is first imported (torch._dynamo
        # imports it, e.g. when an optimizer is built). Imported after the group exists, it keeps the group alive
        # past destroy_process_group; gloo's threads then meet the interpreter's exit and abort a finished run
        # ("terminate called without an active exception", SIGABRT). Imported first, the defaults bind None.
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group(backend=dist_backend(device))  # NCCL where present, else gloo
    return DistInfo(rank, local_rank, world_size, device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)
