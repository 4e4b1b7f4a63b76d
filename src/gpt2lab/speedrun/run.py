"""Run a plan's stages one after another, each a gpt2lab command in its own process, and keep score.

State lives in OUT/speedrun.json: the plan and, for each stage done, its command and wall time. Run
again, a stage done is skipped; a training stage that stopped half-way continues from its newest
checkpoint (``gpt2lab train --resume``); any other stage that stopped is cleared and run again. Each
stage's output goes to the terminal and to OUT/logs/STAGE.log; REPORT.md is rewritten after each stage.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpt2lab.checkpoint.folder import find_latest
from gpt2lab.data.shards import write_json
from gpt2lab.errors import Gpt2LabError
from gpt2lab.speedrun.plan import Plan, Stage, read_plan, stages
from gpt2lab.speedrun.report import write_report

STATE = "speedrun.json"
TRAINING = ("pretrain", "sft", "rl")  # stages that write checkpoints, so they can resume


def read_state(out: Path, plan: Plan, plan_file: str) -> dict:
    """OUT's state, or a new one; a folder begun with another plan is refused (its stages would not match)."""
    path = out / STATE
    if not path.is_file():
        return {"plan_file": plan_file, "plan": plan.to_dict(), "started": _now(), "stages": {}}
    state = json.loads(path.read_text())
    if state["plan"] != plan.to_dict():
        diff = _first_difference(state["plan"], plan.to_dict())
        raise Gpt2LabError(f"{out} was begun with another plan ({diff}): give another --out, or --fresh to start over")
    return state


def _first_difference(old: dict, new: dict) -> str:
    for section in new:
        for key in new[section]:
            if old.get(section, {}).get(key) != new[section][key]:
                return f"{section}.{key}: {old.get(section, {}).get(key)!r} then, {new[section][key]!r} now"
    return "its sections differ"


def save_state(out: Path, state: dict) -> None:
    write_json(out / STATE, state)  # atomic: a crash leaves the old state or the new, never half of one


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def resumable(stage: Stage) -> Stage:
    """The stage as it runs now: a training run with a checkpoint continues; anything half-written is cleared."""
    if stage.name in TRAINING and find_latest(stage.outputs[0]) is not None:
        print(f"{stage.name}: continuing from {find_latest(stage.outputs[0])}", flush=True)
        return Stage(stage.name, stage.title, ["train", "--resume", stage.outputs[0]], stage.outputs,
                     launch=stage.launch)  # fmt: skip
    for path in map(Path, stage.outputs):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return stage


def execute(stage: Stage, log: Path) -> int:
    """Run one stage's command, its output to the terminal and to ``log``; its exit code."""
    head = [sys.executable, "-m", "torch.distributed.run", *stage.launch] if stage.launch else [sys.executable]
    argv = [*head, "-m", "gpt2lab", *stage.argv]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}  # the stage's lines reach the log in the order they were written
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        f.write(f"$ {stage.command()}\n".encode())
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        proc.stdin.write(stage.stdin.encode())
        proc.stdin.close()
        try:
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                f.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        except KeyboardInterrupt:  # the stage got the Ctrl-C too: let it stop (a training run saves nothing here)
            proc.wait()
            raise
        return proc.wait()


def gpus(nproc: int) -> int:
    """Processes of a training stage: nproc, or every visible GPU for 0."""
    if nproc:
        return nproc
    import torch

    return max(torch.cuda.device_count(), 1)


def speedrun(plan_file: str, out: str | Path, fresh: bool = False) -> Path:
    """Run every stage of the plan not done yet in ``out``; REPORT.md's path."""
    plan, out = read_plan(plan_file), Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(out, plan, plan_file)
    todo = stages(plan, out, gpus(plan.pretrain.nproc))
    save_state(out, state)
    for i, stage in enumerate(todo, 1):
        done = state["stages"].get(stage.name)
        banner = f"[{i}/{len(todo)}] {stage.title}"
        if done:
            print(f"{banner}: done before ({done['seconds']:.0f} s)", flush=True)
            continue
        print(f"\n{banner}\n$ {stage.command()}", flush=True)
        running = resumable(stage)
        t0 = time.perf_counter()
        try:
            code = execute(running, out / "logs" / f"{stage.name}.log")
        finally:  # an attempt that stopped still counts in the stage's wall time
            spent = state.setdefault("spent", {})
            spent[stage.name] = spent.get(stage.name, 0.0) + time.perf_counter() - t0
            save_state(out, state)
        if code != 0:
            write_report(plan, out, state, todo)
            log = out / "logs" / f"{stage.name}.log"
            raise Gpt2LabError(
                f"stage {stage.name} failed (exit code {code}); its output is in {log}. "
                "Run the same command again to go on from it"
            )
        state["stages"][stage.name] = {"command": stage.command(), "seconds": spent[stage.name], "finished": _now()}
        save_state(out, state)
        write_report(plan, out, state, todo)
    state["finished"] = state.get("finished") or _now()
    save_state(out, state)
    return write_report(plan, out, state, todo)


def speedrun_command(args) -> int:
    if args.dry_run:
        plan = read_plan(args.plan)
        for stage in stages(plan, args.out, gpus(plan.pretrain.nproc)):
            print(stage.command())
        return 0
    report = speedrun(args.plan, args.out, args.fresh)
    print(f"\nthe report card: {report}")
    return 0
