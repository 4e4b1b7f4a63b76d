"""What a long run needs around the training loop: stop signals and the metrics log.

``StopSignals`` turns SIGTERM/SIGINT (spot instances, job schedulers, Ctrl-C) into a request
the loop honours after the current step, so it can save before exiting. ``MetricsLog`` writes
``metrics.jsonl`` and TensorBoard events on rank 0, and on resume drops the records written
after the checkpoint it resumes from.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path


class StopSignals:
    """While active, SIGTERM/SIGINT only set ``requested``; the loop saves and exits after the step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now, without the save
            self.__exit__()
            raise KeyboardInterrupt
        self.requested = True
        note = f"\n{signal.Signals(signum).name}: finishing this step, then saving (signal again to stop at once)\n"
        os.write(2, note.encode())  # not print: a buffered write inside a signal handler can fail re-entrantly

    def __enter__(self) -> StopSignals:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class MetricsLog:
    """metrics.jsonl + TensorBoard on rank 0; a no-op on the other ranks."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop records from after the checkpoint
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1
            )

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
