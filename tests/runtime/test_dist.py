"""The process group goes away with destroy_distributed, even once torch._dynamo has been imported."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt2lab.runtime.dist import destroy_distributed
from tests.conftest import free_port, join_gloo

WORLD = 2


def _gloo_threads() -> int:
    """This process's threads that belong to a gloo process group (Linux names them)."""
    tasks = Path("/proc/self/task")
    return sum((task / "comm").read_text().strip().startswith(("pt_gloo", "gloo_")) for task in tasks.iterdir())


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    imported_before = "torch.distributed.nn" in sys.modules
    info = join_gloo(rank, WORLD, port)
    importlib.import_module("torch._dynamo")  # what building an optimizer does, after the group exists

    t = torch.full((2,), float(rank))
    dist.all_reduce(t)
    during = _gloo_threads()
    dist.barrier()
    destroy_distributed()
    result = dict(imported_before=imported_before, rank=info.rank, sum=t.tolist(), during=during, after=_gloo_threads())
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through Linux's /proc")
def test_destroy_distributed_ends_gloo_threads_after_dynamo_is_imported(tmp_path):
    """Before the fix the group outlived destroy_process_group here, and its threads sometimes aborted the exit."""
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not result["imported_before"]  # else the test would not exercise the late import
        assert result["rank"] == rank and result["sum"] == [1.0, 1.0]
        assert result["during"] > 0  # the count sees the group's threads while it lives
        assert result["after"] == 0
