"""`gpt2lab plot RUN_DIR`: a run's curves from metrics.jsonl, drawn to a PNG with matplotlib.

Up to four panels: train and val loss, HellaSwag accuracy, learning rate, throughput (tokens/s, with
MFU on a second axis when the run logged it); an RL run draws its rewards (rollouts and held-out),
completion lengths and exploration in place of the first three. Only what the run logged is drawn: a
run without HellaSwag evaluations has no HellaSwag panel.
`gpt2lab plot RUN RUN ...` compares runs instead: the table of ``gpt2lab.report.compare`` on stdout and
their val loss against tokens and against training time, two panels on one PNG.
Matplotlib runs on its Agg backend, so no display is needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

from gpt2lab.errors import Gpt2LabError


class Panel(NamedTuple):
    """One panel of `gpt2lab plot RUN_DIR`: its curves as (metric, label), its title and y label."""

    keys: list[tuple[str, str]]
    title: str
    ylabel: str


THROUGHPUT = Panel([("tokens_per_s", "tokens/s")], "throughput", "tokens/s")
TRAIN_PANELS = [
    Panel([("train_loss", "train"), ("val_loss", "val")], "loss", "cross-entropy (nats)"),
    Panel([("hellaswag", "acc_norm")], "HellaSwag", "accuracy"),
    Panel([("lr", "learning rate")], "learning rate", "lr"),
    THROUGHPUT,
]
RL_PANELS = [  # an RL run (gpt2lab rl): rewards in place of losses, lengths in place of HellaSwag
    Panel(
        [
            ("reward", "rollout reward"),
            ("pass_rate", "rollout pass rate"),
            ("eval_reward", "held-out (greedy)"),
            ("eval_sampled_reward", "held-out (sampled)"),
        ],
        "reward",
        "mean reward / accuracy",
    ),
    Panel([("completion_len", "completion"), ("thinking_len", "thinking")], "completion length", "tokens"),
    Panel(
        [("entropy", "entropy (nats per token)"), ("equal_groups", "share of all-equal groups")],
        "exploration",
        "nats / share",
    ),
    THROUGHPUT,  # the lr is constant in RL: no lr panel
]


def pick_panels(series: dict) -> list[Panel]:
    """The panels of the metrics this run logged, in order (an empty panel tells the reader nothing)."""
    panels = RL_PANELS if "reward" in series else TRAIN_PANELS
    return [p for p in panels if any(series.get(key) for key, _ in p.keys)]


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


def _draw(ax, series: dict, panel: Panel) -> None:
    for key, label in panel.keys:
        if series.get(key):
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 and key != "train_loss" else None)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    if panel is THROUGHPUT and series.get("mfu"):
        twin = ax.twinx()
        steps, values = zip(*series["mfu"])
        twin.plot(steps, [100 * v for v in values], color="tab:red", alpha=0.6, label="MFU")
        twin.set_ylabel("MFU (%)")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl to a PNG (default RUN_DIR/curves.png); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    series = read_metrics(run_dir / "metrics.jsonl")
    panels = pick_panels(series)
    if not panels:
        raise Gpt2LabError(f"{run_dir / 'metrics.jsonl'}: nothing logged yet to plot")
    out = Path(out) if out else run_dir / "curves.png"
    cols = min(len(panels), 2)  # 1 or 2 panels in a row, 3 or 4 in a 2 x 2 grid
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, series, panel)
    for ax in list(axes.flat)[len(panels) :]:  # three panels: the grid's fourth cell stays blank
        fig.delaxes(ax)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def compare_figure(runs: list):
    """A figure of the runs' val loss (gpt2lab.report.compare.RunSummary) against tokens and training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(13, 5))
    for run in runs:
        if run.val:
            tokens, losses = zip(*run.val)
            by_tokens.plot(tokens, losses, marker="o", label=run.name)
            by_time.plot(run.val_seconds, losses, marker="o", label=run.name)
    if runs[0].final_val is not None:  # the target every run is measured against
        for ax in (by_tokens, by_time):
            ax.axhline(runs[0].final_val, color="gray", linestyle="--", linewidth=1, label=f"{runs[0].name} final")
    for ax, what, xlabel in ((by_tokens, "tokens", "tokens"), (by_time, "training time", "training time (s)")):
        ax.set_title(f"val loss vs {what}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_compare(runs: list, out: str | Path) -> Path:
    """Draw the runs' val curves (two panels) to the PNG out; return its path."""
    import matplotlib.pyplot as plt

    fig = compare_figure(runs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def compare_command(run_dirs: list[str], out: str | Path, names: list[str] | None = None) -> Path:
    """Print the comparison table of the run folders and draw their curves to out."""
    from gpt2lab.report.compare import format_table, summarize

    runs = [summarize(d, name) for d, name in zip(run_dirs, names or [None] * len(run_dirs))]
    print(format_table(runs))
    return plot_compare(runs, out)


def plot_command(args: argparse.Namespace) -> int:
    if len(args.run_dir) == 1:
        out = plot_run(args.run_dir[0], args.out)
    else:
        out = compare_command(args.run_dir, args.out or "compare.png")
    print(f"wrote {out}")
    return 0
