"""Sharded training checkpoints (``train.parallel = "fsdp"``) through ``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is the same folder as a plain one (RUN_DIR/checkpoints/step_NNNNNNN/, found by
the same ``find_latest``), with ``dcp/`` in place of ``model.safetensors`` and ``optimizer.pt``:

    step_0000100/
      config.json        format, model config, "checkpoint": "dcp", train_state (step, loader position, config, ...)
      rng.safetensors    every rank's RNG states, as in a plain checkpoint
      dcp/.metadata      DCP's index: each tensor's global shape and which file holds which rows
      dcp/__R_0.distcp   rank R's shards: "model.<name>" weights, "optim.state.<name>.<exp_avg|exp_avg_sq|step>"

Each rank writes its own shards; loading reads whatever rows the current layout needs, so a run saved
on 8 ranks resumes on 4 (or on one process, or under DDP). Only tensors go into ``dcp/`` (DCP reads
tensors with ``torch.load(weights_only=True)``; the optimizer's hyper-parameters come from the config).
A save is written into a hidden temporary folder and renamed once complete, with config.json last, so a
kill during a save (of any rank) leaves the previous checkpoints as they were (gpt2lab.checkpoint.atomic, as
for plain checkpoints: a step saved twice is replaced, never deleted first). With ``async_save`` the
shards are copied to host memory and written by a background thread while training goes on; the folder
gets its name when the write has finished (at the next save, or when the run ends).

The loader's position is in ``train_state["loader"]`` as a token offset into the epoch's global stream
(gpt2lab.data.loader), so the data order does not depend on the world size.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2lab.checkpoint import atomic
from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.gpt import GPT

DCP_DIR = ckpt.DCP_DIR  # "dcp": the shards' folder inside a checkpoint
_pending: dict[Path, tuple] = {}  # run folder -> (future, finish) of its async save still being written


def is_sharded_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / DCP_DIR / ".metadata").is_file()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every save/load of one process that it assumes one process: it is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_dicts(model: GPT, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts keyed by parameter name (DTensor shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def _tensors_only(osd: dict) -> dict:
    """The optimizer's per-parameter tensors (the hyper-parameters in param_groups come from the config)."""
    bad = [f"{n}.{k}" for n, s in osd["state"].items() for k, v in s.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise Gpt2LabError(f"cannot write a sharded checkpoint: optimizer state {bad[0]} is not a tensor")
    return {"state": osd["state"]}


# ----------------------------------------------------------------------------- save


@functools.cache
def _async_group():
    """A gloo group of its own for the background writer, so its collectives never interleave with training's."""
    return dist.new_group(backend="gloo")


def _shared_temp_dir(final: Path) -> Path:
    """Rank 0 makes the temporary folder beside final; every rank learns its name."""
    name = [str(atomic.temp_dir(final)) if _is_main() else None]
    if _distributed():
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    state: dict,
    rng_tensors: dict[str, torch.Tensor],
    keep: int = 0,
    async_save: bool = False,
) -> Path | None:
    """Every rank writes its shards into RUN_DIR/checkpoints/step_NNNNNNN (atomically); rank 0 returns the folder.

    A collective: every rank calls it. ``state`` (JSON-able) and ``rng_tensors`` are written by rank 0.
    """
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    finish_pending(run_dir)  # one background write at a time
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        atomic.recover(root, clean=True)  # what a killed save left (no save runs now): temporary folders, asides
    tmp = _shared_temp_dir(final)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    payload = {"model": model_sd, "optim": _tensors_only(optim_sd)}
    config = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "model": model.config.to_dict(),
              "checkpoint": "dcp", ckpt.TRAIN_STATE_KEY: state}  # fmt: skip

    def finish() -> None:  # rank 0, once every rank's shards and DCP's .metadata are on disk
        if not _is_main():
            return
        ckpt.save_tensors({k: v.contiguous() for k, v in rng_tensors.items()}, tmp / ckpt.RNG_NAME)
        (tmp / ckpt.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        atomic.publish(tmp, final)  # the same step saved twice: the new one replaces the old
        if keep > 0:
            for old in ckpt.checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    try:
        if async_save and _distributed():
            future = dcp.async_save(payload, checkpoint_id=str(tmp / DCP_DIR), process_group=_async_group())
            _pending[run_dir] = (future, finish, tmp)
            return final if _is_main() else None
        with _quiet_single_process():
            dcp.save(payload, checkpoint_id=str(tmp / DCP_DIR), no_dist=not _distributed())
        finish()
    except BaseException:
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final if _is_main() else None


def finish_pending(run_dir: str | Path | None = None) -> None:
    """Wait for the background save of run_dir (or of every run) and give its folder its step_ name."""
    for key in [k for k in _pending if run_dir is None or k == Path(run_dir)]:
        future, finish, tmp = _pending.pop(key)
        try:
            future.result()
            finish()
        except BaseException:
            if _is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise


# ----------------------------------------------------------------------------- load


def _load_sharded(folder: Path, model: GPT, optimizer: torch.optim.Optimizer) -> None:
    """DCP shards into a model of any layout (FSDP on any world size, DDP, one process): DCP reshards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd = _state_dicts(model, optimizer)  # initialises the optimizer's state to load into
    payload = {"model": model_sd, "optim": _tensors_only(optim_sd)}
    try:
        with _quiet_single_process():
            dcp.load(payload, checkpoint_id=str(folder / DCP_DIR), no_dist=not _distributed())
    except Exception as e:  # DCP raises CheckpointException with every rank's traceback: one line instead
        first = next((line for line in str(e).splitlines() if "Error" in line), str(e).splitlines()[0])
        why = first.strip()[:300]
        raise Gpt2LabError(f"{folder / DCP_DIR}: does not match this model and optimizer ({why})") from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def _load_plain_into_sharded(folder: Path, model: GPT, optimizer: torch.optim.Optimizer) -> None:
    """A plain (DDP) checkpoint into an FSDP model: each rank reads the whole files and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    weights = ckpt.load_state_dict(folder / ckpt.WEIGHTS_NAME)
    expected = {k: v.shape for k, v in model.state_dict().items()}  # global shapes, DTensors or not
    for k in ckpt.tied_keys(model):
        weights[k] = weights["transformer.wte.weight"]
    wrong = sorted(set(expected) ^ set(weights)) or [k for k in expected if weights[k].shape != expected[k]]
    if wrong:
        raise Gpt2LabError(f"{folder / ckpt.WEIGHTS_NAME}: weights do not match the config (first: {wrong[0]})")
    try:
        saved = torch.load(folder / ckpt.OPTIMIZER_NAME, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise Gpt2LabError(f"{folder / ckpt.OPTIMIZER_NAME}: file not found") from None
    # the plain state dict numbers parameters in param-group order; this optimizer's groups hold the same order
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    numbers = [i for g in saved["param_groups"] for i in g["params"]]
    if len(names) != len(numbers):
        raise Gpt2LabError(f"{folder / ckpt.OPTIMIZER_NAME}: does not match this model's optimizer")
    fqn = dict(zip(numbers, names))
    groups = [dict(g, params=[fqn[i] for i in g["params"]]) for g in saved["param_groups"]]
    optim_sd = {"state": {fqn[i]: s for i, s in saved["state"].items()}, "param_groups": groups}
    set_state_dict(
        model, optimizer, model_state_dict=weights, optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )  # fmt: skip


def load_training_checkpoint(
    folder: str | Path, model: GPT, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Weights and optimizer state of a plain or sharded checkpoint into a plain or FSDP model; (train_state, rng).

    Plain into plain is gpt2lab.checkpoint.folder's load; every other pair goes through the state-dict APIs of
    torch.distributed.checkpoint, which shard or gather as the model's layout needs.
    """
    from gpt2lab.train.fsdp import is_sharded

    folder = Path(folder)
    if not is_sharded_checkpoint(folder) and not is_sharded(model):
        return ckpt.load_training_checkpoint(folder, model, optimizer)
    state = ckpt.read_json(folder / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY)
    if not isinstance(state, dict):
        raise Gpt2LabError(f"{folder}: a model checkpoint without training state; it cannot be resumed")
    if is_sharded_checkpoint(folder):
        _load_sharded(folder, model, optimizer)
    else:
        _load_plain_into_sharded(folder, model, optimizer)
    return state, ckpt.load_state_dict(folder / ckpt.RNG_NAME)


def consolidate(source: str | Path, out: str | Path) -> Path:
    """A checkpoint (or a run's newest) as a plain one in out: model.safetensors + config.json, no training state."""
    folder = Path(source)
    if not ckpt.is_checkpoint(folder):
        folder = ckpt.find_latest(folder)
        if folder is None:
            raise Gpt2LabError(f"{source}: not a gpt2lab checkpoint or a run folder with one")
    if Path(out).resolve() == folder.resolve():
        raise Gpt2LabError(f"{out}: give another folder than the checkpoint's own")
    model = ckpt.load_model(folder)  # gathered on this one process (gpt2lab.checkpoint.folder reads the dcp/ shards)
    extra = {k: v for k, v in ckpt.read_json(Path(folder) / ckpt.CONFIG_NAME).items()
             if k not in ("format", "format_version", "model", "checkpoint", ckpt.TRAIN_STATE_KEY)}  # fmt: skip
    out = ckpt.save_model(model, out, extra=extra)
    n = model.num_params(non_embedding=False)
    print(f"wrote {out / ckpt.WEIGHTS_NAME} ({n / 1e6:.1f}M parameters) from {folder}")
    return out
