"""`gpt2lab ablate BASE.toml --variant NAME:KEY=VALUE,... ...`: what each idea buys, on the same data and budget.

The base config and each variant (the base with the variant's ``--set`` overrides) are trained one after
the other, each in its own folder RUNS_DIR/NAME, through the same entry point as `gpt2lab train`
(``gpt2lab.train.loop.train``). Every config is built, and so every key checked, before any training starts.
A variant whose checkpoint reached max_steps is skipped and an unfinished one resumed, so an
interrupted ablation continues where it stopped. It ends with the comparison of `gpt2lab plot RUN RUN ...`:
the table (tokens to reach the base's final val loss) and the val curves.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.config import Config, load_config
from gpt2lab.errors import Gpt2LabError
from gpt2lab.report.compare import config_changes

BASE_NAME = "base"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# a comma starts a new setting only when "section.key=" follows, so values may hold commas (moe_layers="1,3")
_NEXT_SETTING = re.compile(r",(?=\s*[A-Za-z_]\w*\.[A-Za-z_]\w*=)")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'relu2:model.mlp=relu2,optim.lr=1e-3' -> ('relu2', ['model.mlp=relu2', 'optim.lr=1e-3'])."""
    name, colon, settings = text.partition(":")
    name = name.strip()
    if not colon or not _NAME.fullmatch(name) or not settings.strip():
        raise Gpt2LabError(f"--variant {text}: expected NAME:section.key=value[,section.key=value...], "
                           "e.g. --variant relu2:model.mlp=relu2")  # fmt: skip
    if name == BASE_NAME:
        raise Gpt2LabError(f"--variant {text}: the name {BASE_NAME!r} is the base config's row; choose another")
    return name, [s.strip() for s in _NEXT_SETTING.split(settings)]


def build_variants(base: str | Path, variants: list[str], sets: list[str] = ()) -> dict[str, Config]:
    """{name: config}: the base (with sets) first, then each variant; every key checked before training."""
    configs = {BASE_NAME: load_config(base, sets)}
    for text in variants:
        name, overrides = parse_variant(text)
        if name in configs:
            raise Gpt2LabError(f"--variant {text}: the name {name!r} is used twice")
        try:
            configs[name] = load_config(base, [*sets, *overrides])
        except Gpt2LabError as e:
            raise Gpt2LabError(f"--variant {name}: {e}") from None
    return configs


def run_state(cfg: Config, run_dir: Path) -> str:
    """'new', 'resume' or 'done' for this config in run_dir; an error if run_dir holds another config's run."""
    latest = ckpt.find_latest(run_dir)
    if latest is None:
        return "new"
    state = ckpt.read_json(latest / ckpt.CONFIG_NAME).get(ckpt.TRAIN_STATE_KEY) or {}
    # a setting newer than the saved run counts as its default (the code that ran it had only that behaviour)
    saved = {s: {**t, **(state.get("config") or {}).get(s, {})} for s, t in Config().to_dict().items()}
    ours = cfg.to_dict()
    if ours["train"]["micro_batch"] is None:  # auto: resolved when the run started (as gpt2lab.train.loop does)
        ours["train"]["micro_batch"] = saved.get("train", {}).get("micro_batch")
    if saved != ours:
        changed = ", ".join(config_changes(ours, saved)) or "the saved config"
        raise Gpt2LabError(f"{run_dir} holds a run of another config ({changed} differ); "
                           "give another --runs-dir or delete that folder")  # fmt: skip
    return "done" if state.get("step", -1) >= cfg.train.max_steps else "resume"


def ablate(configs: dict[str, Config], runs_dir: Path) -> list[Path]:
    """Train each config in runs_dir/NAME (skipping finished ones, resuming unfinished ones); return the folders."""
    from gpt2lab.train.command import train_stage

    plan = {name: (cfg, runs_dir / name, run_state(cfg, runs_dir / name)) for name, cfg in configs.items()}
    for i, (name, (cfg, run_dir, state)) in enumerate(plan.items(), 1):
        what = ", ".join(config_changes(cfg.to_dict(), configs[BASE_NAME].to_dict())) or "the base config"
        if state == "done":
            print(f"== ablate {i}/{len(plan)} {name}: finished in {run_dir}, skipped")
            continue
        print(f"== ablate {i}/{len(plan)} {name}: {what} -> {run_dir}{' (resuming)' if state == 'resume' else ''}")
        train_stage(cfg, run_dir, resume=state == "resume")
    return [run_dir for _, run_dir, _ in plan.values()]


def ablate_command(args: argparse.Namespace) -> int:
    """`gpt2lab ablate BASE.toml --variant ... [--set ...] [--runs-dir DIR] [--out PNG]`."""
    from gpt2lab.report.plot import compare_command

    configs = build_variants(args.config, args.variant, args.set)
    runs_dir = Path(args.runs_dir or Path("runs") / f"ablate-{Path(args.config).stem}")
    run_dirs = ablate(configs, runs_dir)
    out = compare_command([str(d) for d in run_dirs], args.out or runs_dir / "compare.png", list(configs))
    print(f"wrote {out}")
    return 0
