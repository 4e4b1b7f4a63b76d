"""What a long run needs around the training loop: stop signals and the metrics log.

``StopSignals`` turns SIGTERM/SIGINT (spot instances, job schedulers, Ctrl-C) into a request
the loop honours after the current step, so it can save before exiting. ``MetricsLog`` writes
``metrics.jsonl`` and TensorBoard events on rank 0, and on resume drops the records written
after the checkpoint it resumes from (and a last line cut short by a kill in mid-write).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from gpt2lab.errors import Gpt2LabError


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


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file ([] if there is none), without a partial last line.

    A run killed in the middle of a write (kill -9, a lost node) leaves its last line cut short;
    that line is dropped with a notice. Any other unreadable line is an error naming it.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):
                print(f"notice: {path}: dropped a partial last line (the run was stopped mid-write)", file=sys.stderr)
                break
            raise Gpt2LabError(f"{path}, line {number}: not a metrics record; fix or delete that line") from None
        records.append(record)
    return records


class MetricsLog:
    """metrics.jsonl + TensorBoard on rank 0; a no-op on the other ranks."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        # a new run starts the log afresh (an earlier attempt in this folder never saved a checkpoint);
        # a resumed one keeps the records up to its checkpoint
        kept = [] if resume_step is None else [r for r in read_records(self.path) if r["step"] <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)  # a kill during this rewrite leaves the old log whole
        self.file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1
            )

    def log(self, step: int, **values: float | list) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):  # lists (MoE's expert shares) stay in metrics.jsonl
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def step_suffix(record: dict, skipped_steps: int = 0) -> str:
    """The end of a step's printed line: MFU, RL's rollout speed and rewards, skipped steps, MoE balance."""
    out = f" | MFU {record['mfu']:6.1%}" if "mfu" in record else ""
    out += f" | rollout {record['rollout_tokens_per_s']:,.0f} tok/s" if "rollout_tokens_per_s" in record else ""
    out += f" | reward {record['reward']:.3f}" if "reward" in record else ""
    out += f" | held-out {record['eval_reward']:.3f}" if "eval_reward" in record else ""
    out += f" sampled {record['eval_sampled_reward']:.3f}" if "eval_sampled_reward" in record else ""
    out += f" | skipped {skipped_steps}" if skipped_steps else ""
    return out + (f" | moe max/mean {record['moe_load_max_over_mean']:.2f}" if "moe_load" in record else "")
