"""Turn a ``--model`` argument into a GPT: a hub name, a Hugging Face folder, a checkpoint or a run."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2lab.checkpoint import find_latest, is_checkpoint
from gpt2lab.checkpoint import load_model as load_checkpoint
from gpt2lab.errors import Gpt2LabError
from gpt2lab.hf import HUB_NAMES, download, load_hf_folder
from gpt2lab.model import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(spec: str) -> tuple[str, Path]:
    """(kind, folder) for a model spec; kind is 'checkpoint' or 'hf'. Downloads hub names."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_checkpoint(path):
            return "checkpoint", path
        if (path / "checkpoints").is_dir():
            latest = find_latest(path)
            if latest is None:
                raise Gpt2LabError(f"{path}: run folder holds no complete checkpoint yet")
            return "checkpoint", latest
        if (path / "config.json").is_file():
            return "hf", path
        raise Gpt2LabError(f"{path}: not a gpt2lab checkpoint, run folder or Hugging Face folder (no config.json)")
    if path.exists():
        raise Gpt2LabError(f"{path}: is a file; --model takes a folder or a GPT-2 name")
    looks_like_repo = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if spec in HUB_NAMES or looks_like_repo:
        return "hf", download(spec)
    raise Gpt2LabError(f"{spec}: no such folder, and not a GPT-2 name ({', '.join(HUB_NAMES)})")


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> GPT:
    """A GPT in eval mode on device, from any spec that ``resolve`` accepts."""
    kind, folder = resolve(spec)
    model = load_checkpoint(folder) if kind == "checkpoint" else load_hf_folder(folder)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    return model.to(device=device, dtype=dtype).eval()
