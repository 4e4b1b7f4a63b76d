"""What a stage trains for, given to the one training loop (``gpt2lab.train.loop.train``).

The loop runs steps, evaluations and checkpoints; an ``Objective`` says what a step computes: it opens the
stage's train and val loaders (loaders only yield batches), gives the loss of a micro-batch, and any per-step
stats to log. A fine-tuning stage also loads the weights it starts from (``init_weights``, fresh runs only).
Pretraining's objective, the next-token loss over token shards, is here; SFT's is in ``gpt2lab.sft.objective``
and RL's in ``gpt2lab.rl.objective``. An ``Evaluation`` is a measurement run every so many steps (HellaSwag,
given by ``gpt2lab.train.command``), so the loop imports no evaluation package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpt2lab.errors import Gpt2LabError

if TYPE_CHECKING:
    from gpt2lab.model.gpt import GPT
    from gpt2lab.runtime.dist import DistInfo


class Objective:
    """A stage's training objective; the base class is the next-token loss of every target (pretraining).

    The loop calls, in order: ``check(cfg)`` before anything is built; ``init_weights(raw_model)`` on a fresh
    run; ``open(cfg, raw_model, info, resume_from)``, which sets ``loader`` (``next_batch``, ``state_dict``,
    ``load_state_dict``) and ``val_loader`` (also ``reset`` and ``batches_per_epoch``; None = no val loss);
    then every micro-step ``loss(model, batch, targets)`` and every logged step ``stats()`` (on every rank).
    """

    # True: the step's loss is the mean over the trained tokens (target != -1) of all its micro-batches on all
    # ranks (the loop reads a step's micro-batches first to weigh them); False: the mean of micro-batch means
    masked = False
    loader: object = None
    val_loader: object | None = None

    def check(self, cfg) -> None:
        """Fail early, before anything is built or written."""

    def init_weights(self, raw_model: GPT) -> None:
        """A fresh run's starting weights (fine-tuning: the base model's); the default keeps the random init."""

    def open(self, cfg, raw_model: GPT, info: DistInfo, resume_from: Path | None) -> None:
        """Set ``self.loader`` and ``self.val_loader`` for this rank."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: tuple, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of one micro-batch (x, y[, doc_ids]) against ``targets``."""
        x, _, *docs = batch
        _, loss = model(x, targets, **({"doc_ids": docs[0]} if docs else {}))  # doc_ids: SFT's document mask
        return loss

    def stats(self) -> dict:
        """Extra metrics of the steps since the last call (for the metrics log); every rank calls it."""
        return {}

    def step_tokens(self, total_batch: int, seconds: float) -> tuple[float, float]:
        """(tokens the last step trained on, seconds it trained) for its tokens/s and MFU, all ranks; every rank
        calls it. Pretraining and SFT: train.total_batch tokens over the whole step."""
        return total_batch, seconds


class NextToken(Objective):
    """Pretraining: the next-token loss over the token shards of [data] (and its val split when val_every > 0)."""

    def check(self, cfg) -> None:
        from gpt2lab.data.shards import read_manifest

        manifest = read_manifest(cfg.data.path)  # clear error on a missing or unfinished folder
        vocab = int(manifest.get("tokenizer", {}).get("vocab_size", 50257))
        if cfg.model.vocab_size < vocab:
            raise Gpt2LabError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of {cfg.data.path} ({vocab})"
            )

    def open(self, cfg, raw_model: GPT, info: DistInfo, resume_from: Path | None) -> None:
        from gpt2lab.data.loader import ShardLoader, open_val_loader
        from gpt2lab.runtime import hardware

        kw = dict(rank=info.rank, world_size=info.world_size, device=info.device)
        self.loader = ShardLoader(
            cfg.data.path, "train", cfg.train.micro_batch, cfg.model.block_size, shuffle=cfg.data.shuffle,
            seed=cfg.data.seed, **kw,
        )  # fmt: skip
        self.val_loader = None
        if cfg.eval.val_every > 0:
            self.val_loader, note = open_val_loader(cfg.data.path, cfg.train.micro_batch, cfg.model.block_size, **kw)
            if note:
                hardware.print_notices([note if self.val_loader else f"val loss unavailable: {note}"])


class MaskedNextToken(Objective):
    """The next-token loss averaged over the step's trained tokens (targets -1 elsewhere), over given loaders."""

    masked = True

    def __init__(self, loader: object = None, val_loader: object | None = None):
        self.loader, self.val_loader = loader, val_loader


@dataclass
class Evaluation:
    """A measurement every ``every`` steps (and at the end): ``measure(run)`` -> a number, on every rank.

    ``check()`` runs before anything is built (its data must be at hand before hours of training, not after)."""

    name: str  # its key in the metrics log and the checkpoint's metrics
    every: int
    measure: Callable[[object], float]  # given the loop's Run
    check: Callable[[], None] = field(default=lambda: None)
