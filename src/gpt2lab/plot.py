"""`gpt2lab plot RUN_DIR`: a run's curves from metrics.jsonl, drawn to a PNG with matplotlib.

Four panels: train and val loss, HellaSwag accuracy, learning rate, throughput (tokens/s, with
MFU on a second axis when the run logged it). Panels without data say so instead of vanishing.
Matplotlib runs on its Agg backend, so no display is needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpt2lab.errors import Gpt2LabError


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from a metrics.jsonl file (the last record of a step wins)."""
    if not path.is_file():
        raise Gpt2LabError(f"{path}: file not found (is {path.parent} a run folder of `gpt2lab train`?)")
    series: dict[str, dict[int, float]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise Gpt2LabError(f"{path}:{n}: not a metrics record") from None
        for key, value in record.items():
            if isinstance(value, int | float):
                series.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def _draw(ax, series: dict, keys: list[tuple[str, str]], title: str, ylabel: str, log: bool = False) -> None:
    drawn = False
    for key, label in keys:
        if series.get(key):
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 and key != "train_loss" else None)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend()
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl to a PNG (default RUN_DIR/curves.png); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    series = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out) if out else run_dir / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _draw(axes[0, 0], series, [("train_loss", "train"), ("val_loss", "val")], "loss", "cross-entropy (nats)")
    _draw(axes[0, 1], series, [("hellaswag", "acc_norm")], "HellaSwag", "accuracy")
    _draw(axes[1, 0], series, [("lr", "learning rate")], "learning rate", "lr")
    _draw(axes[1, 1], series, [("tokens_per_s", "tokens/s")], "throughput", "tokens/s")
    if series.get("mfu"):
        twin = axes[1, 1].twinx()
        steps, values = zip(*series["mfu"])
        twin.plot(steps, [100 * v for v in values], color="tab:red", alpha=0.6, label="MFU")
        twin.set_ylabel("MFU (%)")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_command(args: argparse.Namespace) -> int:
    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0
