"""What the SFT tests share."""

from __future__ import annotations


class MaskedBatches:
    """An SFT loader stand-in: fixed micro-batches in turn."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]
