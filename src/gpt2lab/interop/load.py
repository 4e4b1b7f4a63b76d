"""Turn a ``--model`` argument into a GPT: a hub name, a Hugging Face folder, a checkpoint or a run."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import torch

from gpt2lab.checkpoint.folder import find_latest, is_checkpoint
from gpt2lab.checkpoint.folder import load_model as load_checkpoint
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop.hf import HUB_NAMES, download, load_hf_folder
from gpt2lab.model.gpt import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUN_FILES = ("checkpoints", "config.toml", "metrics.jsonl")  # what `gpt2lab train` writes into a run folder
# a hub repository id, as huggingface_hub validates it: owner/name, each part letters, digits, - _ . (no leading
# or trailing - or .), at most 96 characters per part; "--" and ".." are refused there too (see is_hub_id)
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?", re.ASCII)


def is_run_folder(path: Path) -> bool:
    """True if `gpt2lab train` has written into this folder (whether or not it holds a checkpoint)."""
    return any((path / name).exists() for name in RUN_FILES)


def no_checkpoint_yet(run_dir: Path) -> str:
    """The message for a run folder that stopped before its first save: how to restart it, or clear it."""
    config = run_dir / "config.toml"  # the run's own settings, written when it started
    config = shlex.quote(str(config)) if config.is_file() else "CONFIG"
    restart = f"gpt2lab train {config} --run-dir {shlex.quote(str(run_dir))}"
    return (
        f"{run_dir}: a run folder without a checkpoint yet (the run stopped before its first save), "
        f"so there is nothing to load or resume; restart it with `{restart}`, or remove the folder"
    )


def resolve(spec: str) -> tuple[str, Path]:
    """(kind, folder) for a model spec; kind is 'checkpoint' or 'hf'. Downloads hub names."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_checkpoint(path):
            return "checkpoint", path
        latest = find_latest(path)
        if latest is not None:
            return "checkpoint", latest
        if (path / "config.json").is_file():
            return "hf", path
        if is_run_folder(path):
            raise Gpt2LabError(no_checkpoint_yet(path))
        raise Gpt2LabError(f"{path}: not a gpt2lab checkpoint, run folder or Hugging Face folder (no config.json)")
    if path.exists():
        raise Gpt2LabError(f"{path}: is a file; --model takes a folder or a GPT-2 name")
    return "hf", from_hub(spec, path)


def from_hub(spec: str, path: Path) -> Path:
    """The downloaded folder of a spec that is no local folder: only a GPT-2 name or an owner/name hub id is
    asked for; any other spec is a path, and the error says where it was looked for."""
    looked = f"{spec}: no such folder (looked for {path.resolve()})"
    if spec in HUB_NAMES:
        return download(spec)
    if is_hub_id(spec):
        try:
            return download(spec)
        except Gpt2LabError as e:  # owner/name may have been meant as a folder here: say both
            raise Gpt2LabError(f"{looked}, and {e}") from None
    if "/" in spec or os.sep in spec:
        raise Gpt2LabError(looked)
    raise Gpt2LabError(f"{looked}, and not a GPT-2 name ({', '.join(HUB_NAMES)})")


def is_hub_id(spec: str) -> bool:
    """True if spec can only mean a hub repository "owner/name": it has the hub's shape, and its owner is no
    local folder. Anything else that names a path (./x, ~/x, /x, runs/x with runs/ here, a/b/c) is looked
    for on disk only, so a missing folder is reported as one instead of as a failed download."""
    if not HUB_ID.fullmatch(spec) or "--" in spec or ".." in spec:
        return False
    return not Path(spec.split("/")[0]).is_dir()


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> GPT:
    """A GPT in eval mode on device, from any spec that ``resolve`` accepts."""
    kind, folder = resolve(spec)
    model = load_checkpoint(folder) if kind == "checkpoint" else load_hf_folder(folder)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    return model.to(device=device, dtype=dtype).eval()
