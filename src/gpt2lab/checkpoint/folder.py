"""Checkpoints: a folder with ``model.safetensors`` and a readable ``config.json``.

``config.json`` holds ``{"format": "gpt2lab", "format_version": 1, "model": {GPTConfig}}``
plus whatever the writer adds (training adds its state beside it). Weights are
safetensors, so loading never unpickles anything. The tied LM head is stored once, as
``transformer.wte.weight``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.checkpoint import atomic
from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "gpt2lab"
FORMAT_VERSION = 1
TIED_KEYS = ("lm_head.weight",)  # the same tensor as transformer.wte.weight
DCP_DIR = "dcp"  # a sharded (FSDP) checkpoint's weights: torch.distributed.checkpoint shards (gpt2lab.train.dcp)


def tied_keys(model: GPT) -> tuple[str, ...]:
    """The state-dict keys that are another key's tensor (stored once): the tied LM head, if tied."""
    return TIED_KEYS if model.config.tie_embeddings else ()


def read_json(path: Path) -> dict:
    """A JSON object from a file, or one clear error naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise Gpt2LabError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gpt2LabError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise Gpt2LabError(f"{path}: expected a JSON object")
    return data


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, leaving the file readable as the umask allows (it writes 0600 otherwise)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~atomic.umask())


def is_checkpoint(folder: str | Path) -> bool:
    """True if the folder's config.json says it is a gpt2lab checkpoint."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def save_model(model: GPT, folder: str | Path, extra: dict | None = None) -> Path:
    """Write weights and config into folder (created if needed); return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tied = tied_keys(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_tensors(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(), **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_model_config(folder: str | Path) -> GPTConfig:
    path = Path(folder) / CONFIG_NAME
    data = read_json(path)
    if data.get("format") != FORMAT or not isinstance(data.get("model"), dict):
        raise Gpt2LabError(f'{path}: not a gpt2lab checkpoint config (no "format": "gpt2lab" and "model")')
    try:
        return GPTConfig.from_dict(data["model"])
    except (TypeError, ValueError) as e:
        raise Gpt2LabError(f"{path}: invalid model config: {e}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or one clear error naming it (missing, truncated, foreign)."""
    path = Path(path)
    if not path.is_file():
        raise Gpt2LabError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise Gpt2LabError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def empty_model(config: GPTConfig) -> GPT:
    """A GPT with uninitialised CPU weights, to be filled by loading (skips the random init)."""
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.transformer.wte.weight = model.lm_head.weight  # keep the tie explicit after to_empty
    return model


def check_and_load(model: GPT, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load state into model after checking keys and shapes; errors name the source file."""
    tied = tied_keys(model)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(tied))
    if missing or unexpected:
        raise Gpt2LabError(
            f"{source}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise Gpt2LabError(f"{source}: {k} has shape {tuple(state[k].shape)} but the config needs {tuple(shape)}")
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items() if k not in tied}, strict=False)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A GPT from a gpt2lab checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Gpt2LabError(f"{folder}: no such checkpoint folder")
    if not (folder / CONFIG_NAME).is_file():
        raise Gpt2LabError(f"{folder}: not a checkpoint (no {CONFIG_NAME})")
    config = read_model_config(folder)
    model = empty_model(config)
    if not (folder / WEIGHTS_NAME).is_file() and (folder / DCP_DIR / ".metadata").is_file():
        load_sharded_weights(model, folder / DCP_DIR)
        return model.to(device)
    state = load_state_dict(folder / WEIGHTS_NAME)
    check_and_load(model, state, folder / WEIGHTS_NAME)
    return model.to(device)


def load_sharded_weights(model: GPT, path: Path) -> None:
    """The weights of a sharded checkpoint gathered into one model on this process (DCP reads only the "model."
    tensors, each with torch.load(weights_only=True), and reshards them to this process's whole tensors)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = model.state_dict()  # the tied head appears under both names, one tensor: filled once or twice alike
    try:
        with warnings.catch_warnings():  # DCP says that no_dist=True means one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # DCP's CheckpointException carries a traceback per rank: one line instead
        why = str(e).strip().splitlines()[-1][:300]
        raise Gpt2LabError(f"{path}: weights do not match the config ({why})") from None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first: RUN_DIR/checkpoints/step_NNNNNNN/.

    A save is written to a temporary folder and renamed, so every ``step_*`` folder is complete; one that a save
    killed while replacing it left aside goes back to its name first (gpt2lab.checkpoint.atomic).
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    atomic.recover(root)
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


# --- training state (save / resume)
# A training checkpoint is a model checkpoint plus: optimizer.pt (torch.save of the optimizer's
# state dict: tensors and plain values, read back with weights_only=True), rng.safetensors (the
# RNG states of every rank as tensors) and, in config.json under "train_state", the readable
# loop state (step, loader states, resolved config, git commit). It is written into a hidden
# temporary folder in checkpoints/ and renamed to step_NNNNNNN/ once complete (gpt2lab.checkpoint.atomic).

OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng.safetensors"
TRAIN_STATE_KEY = "train_state"


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: tensors (torch, cuda, numpy keys) and plain values (python, numpy rest)."""
    import random

    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # ('MT19937', uint32[624], ...)
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    plain = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Restore what ``rng_state`` captured."""
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    state: dict,
    rng_tensors: dict[str, torch.Tensor],
    keep: int = 0,
) -> Path:
    """Write RUN_DIR/checkpoints/step_NNNNNNN atomically; keep the newest ``keep`` (0 = all). Return it.

    ``model`` is the raw model (never a compiled or DDP-wrapped one); ``state`` is JSON-able.
    config.json is written last, and the folder only gets its step_ name once everything is on
    disk, so a crash during a save leaves the previous checkpoints as they were.
    """
    import shutil

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    atomic.recover(root, clean=True)  # what a killed save left: its temporary folder, a step it had moved aside
    final = root / f"step_{step:07d}"
    tmp = atomic.temp_dir(final)
    try:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        save_tensors({k: v.contiguous() for k, v in rng_tensors.items()}, tmp / RNG_NAME)
        save_model(model, tmp, extra={TRAIN_STATE_KEY: state})
        atomic.publish(tmp, final)  # the same step saved twice: the new one replaces the old
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(
    folder: str | Path, model: GPT, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load weights and optimizer state in place; return (train_state, rng tensors)."""
    folder = Path(folder)
    state = read_json(folder / CONFIG_NAME).get(TRAIN_STATE_KEY)
    if not isinstance(state, dict):
        raise Gpt2LabError(f"{folder}: a model checkpoint without training state; it cannot be resumed")
    weights = load_state_dict(folder / WEIGHTS_NAME)
    check_and_load(model, weights, folder / WEIGHTS_NAME)
    try:
        optim_state = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(optim_state)
    except FileNotFoundError:
        raise Gpt2LabError(f"{folder / OPTIMIZER_NAME}: file not found") from None
    except (RuntimeError, ValueError, KeyError) as e:
        raise Gpt2LabError(f"{folder / OPTIMIZER_NAME}: does not match this model's optimizer ({e})") from None
    return state, load_state_dict(folder / RNG_NAME)
