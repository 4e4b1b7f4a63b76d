"""SFT's objective for the training loop: the next-token loss averaged over the assistant's tokens.

The loop (``gpt2lab.train.loop``) averages each step's loss over the trained tokens (targets != -1) of all its
micro-batches on all ranks (``masked``); the batches are conversations packed into rows (``gpt2lab.sft.data``),
and a fresh run starts from the weights of the base model it fine-tunes (``gpt2lab.chat.base``).
"""

from __future__ import annotations

from pathlib import Path

from gpt2lab.train.objective import MaskedNextToken


class SFTObjective(MaskedNextToken):
    """Fine-tuning on conversations: [sft]'s train and val loaders, the masked next-token loss."""

    def __init__(self, sft):
        super().__init__()
        self.sft = sft  # the [sft] section

    def init_weights(self, raw_model) -> None:
        from gpt2lab.chat.base import load_base_weights

        load_base_weights(raw_model, self.sft.model)

    def open(self, cfg, raw_model, info, resume_from: Path | None) -> None:
        from gpt2lab.sft.data import sft_loaders

        self.loader, self.val_loader = sft_loaders(
            cfg, cfg.train.micro_batch, rank=info.rank, world_size=info.world_size, device=info.device,
            resume_from=resume_from,
        )  # fmt: skip
