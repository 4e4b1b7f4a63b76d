"""Runs side by side: the numbers behind `gpt2lab plot RUN RUN ...` and `gpt2lab ablate`.

Each run folder of `gpt2lab train` holds what a comparison needs: ``metrics.jsonl`` (val losses by step,
``ms_per_step`` of the logged steps), ``config.toml`` (the resolved config: tokens per step) and its
checkpoints' ``config.json`` (the git commit). The headline number is **tokens to target**: the tokens a
run took to reach the first run's final val loss, interpolated linearly between the two val points that
bracket it (modded-nanogpt's way of scoring a recipe: the same loss in fewer tokens).

Wall time is the training time the metrics record: each logged step's ``ms_per_step`` stands for the
steps since the previous record (``log.every``); evaluation and checkpointing time are not in it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.errors import Gpt2LabError
from gpt2lab.train.runlog import read_records


@dataclass
class RunSummary:
    """One run's val curve (against tokens and seconds) and what the table shows of it."""

    name: str
    run_dir: Path
    config: dict  # the resolved config ({section: {key: value}}) from RUN_DIR/config.toml
    commit: str | None  # git commit of the newest checkpoint
    tokens_per_step: int
    steps: int  # the last step logged
    val: list[tuple[int, float]]  # (tokens, val loss), ascending tokens
    val_seconds: list[float]  # training seconds at each val point
    wall_s: float  # training seconds up to the last logged step

    @property
    def final_val(self) -> float | None:
        return self.val[-1][1] if self.val else None

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def cumulative_seconds(records: list[dict]) -> list[tuple[int, float]]:
    """(step, training seconds so far) at step 0 and at each record with ms_per_step."""
    points, last_step, total = [(0, 0.0)], 0, 0.0
    for r in sorted((r for r in records if "ms_per_step" in r), key=lambda r: r["step"]):
        total += r["ms_per_step"] / 1e3 * (r["step"] - last_step)  # one record speaks for the steps since the last
        last_step = r["step"]
        points.append((last_step, total))
    return points


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """y at x on the polyline through (x, y) points (ascending x); held flat past either end."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def tokens_to_target(val: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the val loss first reaches target, linear between the bracketing points; None if never."""
    for i, (tokens, loss) in enumerate(val):
        if loss <= target:
            if i == 0:
                return float(tokens)
            t0, l0 = val[i - 1]
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
    return None


def _commit(run_dir: Path) -> str | None:
    latest = ckpt.find_latest(run_dir)
    if latest is None:
        return None
    state = ckpt.read_json(latest / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY) or {}
    return state.get("git_commit")


def summarize(run_dir: str | Path, name: str | None = None) -> RunSummary:
    """A run folder's summary; one error naming the folder when it is not a run of `gpt2lab train`."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    if not (run_dir / "metrics.jsonl").is_file() or not config_path.is_file():
        raise Gpt2LabError(f"{run_dir}: no metrics.jsonl and config.toml (is it a run folder of `gpt2lab train`?)")
    config = tomllib.loads(config_path.read_text())
    records = read_records(run_dir / "metrics.jsonl")
    tokens_per_step = int(config["train"]["total_batch"])
    seconds = cumulative_seconds(records)
    val = sorted((r["step"], r["val_loss"]) for r in records if "val_loss" in r)
    return RunSummary(
        name=name or run_dir.name,
        run_dir=run_dir,
        config=config,
        commit=_commit(run_dir),
        tokens_per_step=tokens_per_step,
        steps=max((r["step"] for r in records), default=0),
        val=[(step * tokens_per_step, loss) for step, loss in val],
        val_seconds=[interpolate(seconds, step) for step, _ in val],
        wall_s=seconds[-1][1],
    )


def config_changes(config: dict, base: dict) -> list[str]:
    """The settings of config that differ from base, as section.key=value ([reference] figures are no setting)."""
    changes = []
    for section, table in config.items():
        if section == "reference":  # a preset's recorded results: they differ between presets, not runs' settings
            continue
        for key, value in table.items() if isinstance(table, dict) else ():
            if base.get(section, {}).get(key) != value:
                changes.append(f"{section}.{key}={value}")
    return changes


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def table_rows(runs: list[RunSummary]) -> list[dict[str, str]]:
    """The comparison table, one dict of column -> text per run (the first run sets the target)."""
    target = runs[0].final_val
    first = tokens_to_target(runs[0].val, target) if target is not None else None
    rows = []
    for run in runs:
        reached = tokens_to_target(run.val, target) if target is not None and run.val else None
        if target is None:
            to_target, ratio = "no target", "-"
        elif not run.val:
            to_target, ratio = "no val loss", "-"
        elif reached is None:
            to_target, ratio = "not reached", "-"
        else:
            to_target, ratio = _tokens(reached), f"{reached / first:.2f}" if first else "-"
        if run is runs[0]:
            config = str(run.run_dir / "config.toml")
        else:  # what makes this run another experiment
            config = ", ".join(config_changes(run.config, runs[0].config)) or "same as first"
        rows.append({
            "run": run.name,
            "commit": (run.commit or "-")[:8],
            "final val": f"{run.final_val:.4f}" if run.final_val is not None else "no val loss",
            "tokens": _tokens(run.tokens),
            "wall": f"{run.wall_s:.1f}s",
            "tokens to target": to_target,
            "ratio": ratio,
            "config": config,
        })  # fmt: skip
    return rows


def format_table(runs: list[RunSummary]) -> str:
    """The table as text: target and column meanings on top, one line per run."""
    rows = table_rows(runs)
    widths = {col: max(len(col), *(len(r[col]) for r in rows)) for col in rows[0]}
    target = runs[0].final_val
    head = (
        f"target: {runs[0].name}'s final val loss {target:.4f}; tokens to target is interpolated between val "
        "points, ratio = those tokens / the first run's"
        if target is not None
        else f"no target: {runs[0].name} logged no val loss"
    )
    lines = [head, "  ".join(col.ljust(w) for col, w in widths.items()).rstrip()]
    lines += ["  ".join(r[col].ljust(w) for col, w in widths.items()).rstrip() for r in rows]
    return "\n".join(lines)
