"""REPORT.md, the speedrun's report card: what ran, how long it took, and what each stage reached.

Every figure is read back from a file a stage wrote (an evaluation's JSON, a run's metrics.jsonl, a
stage's log), so the card shows what the commands printed; a stage not run yet reads "—".
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from gpt2lab import __version__
from gpt2lab.speedrun.plan import Plan, Stage
from gpt2lab.train.run import git_commit
from gpt2lab.train.runlog import read_records

NOT_YET = "—"


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def last_val_loss(run_dir: Path) -> float | None:
    """The last val loss a run logged (metrics.jsonl), if any."""
    losses = [r["val_loss"] for r in read_records(run_dir / "metrics.jsonl") if "val_loss" in r]
    return losses[-1] if losses else None


def _pct(value: float | None) -> str:
    return NOT_YET if value is None else f"{value:.1%}"


def _num(value: float | None, digits: int = 3) -> str:
    return NOT_YET if value is None else f"{value:.{digits}f}"


def figures(plan: Plan, out: Path) -> list[tuple[str, str, str]]:
    """(stage, figure, value) rows of the card."""
    loss = _json(out / "eval" / "base-loss.json").get("loss", {})
    hs = _json(out / "eval" / "base-hellaswag.json").get("hellaswag", {})
    sft, rl = _json(out / "eval" / "sft-arith.json"), _json(out / "eval" / "rl-arith.json")
    n, k = f"{plan.rl.eval_problems} held-out problems", plan.rl.eval_samples
    examples = hs.get("count", plan.eval.hellaswag_limit or 10042)
    rows = [
        ("pretrain", "val loss (nats per token)", _num(loss.get("loss"))),
        ("pretrain", "val bits per byte (comparable across tokenizers)", _num(loss.get("bpb"))),
        ("pretrain", f"HellaSwag acc_norm ({examples:,} examples; chance 25%)", _pct(hs.get("acc_norm"))),
        ("sft", "val loss (assistant tokens)", _num(last_val_loss(out / "sft"))),
    ]
    for name, result in (("sft", sft), ("rl", rl)):
        rows += [
            (name, f"greedy accuracy ({n})", _pct(result.get("pass@1"))),
            (name, f"mean reward: sampled pass@1 at T = 1, {k} per problem", _pct(result.get("sampled_pass@1"))),
            (name, f"pass@{k}", _pct(result.get(f"pass@{k}"))),
            (name, "thinking tokens per sampled reply", _num(result.get("sampled_think_tokens"), 1)),
        ]
    return rows


def machine() -> str:
    """The CPU (and GPU), cores and load: what the wall times were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}{load}; torch {torch.__version__}, gpt2lab {__version__}{_commit()}"


def _commit() -> str:
    sha = git_commit()
    return f" (commit {sha[:7]})" if sha else ""


def log_text(out: Path, stage: str) -> str:
    """A stage's output without its command line and progress bars."""
    path = out / "logs" / f"{stage}.log"
    if not path.is_file():
        return ""
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()[1:]
    return "\n".join(line for line in lines if not line.startswith("warning:") and "it/s]" not in line).strip()


def conversation(plan: Plan, out: Path) -> list[str]:
    """The chat stage's questions and the chatbot's replies, as Markdown lines."""
    path = out / "logs" / "chat.log"
    if not path.is_file():
        return [NOT_YET]
    text = path.read_text(errors="replace")
    replies = text.split("\n[new conversation]\n")
    replies[0] = replies[0].split("\n", 2)[-1]  # after the command line and the '[chatting with ...]' notice
    lines = []
    for question, reply in zip(plan.chat.prompts, replies, strict=False):
        lines += [f"> **User:** {question}", ">", f"> **Assistant:** {' '.join(reply.split())}", ""]
    return lines


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_report(plan: Plan, out: Path, state: dict, todo: list[Stage]) -> Path:
    """Write OUT/REPORT.md from the state and the stages' files; its path."""
    done = state["stages"]
    total = sum(s["seconds"] for s in done.values())
    status = f"finished {state['finished']}" if state.get("finished") else f"{len(done)} of {len(todo)} stages done"
    md = [
        "# gpt2lab speedrun: the report card", "",
        f"Plan `{state['plan_file']}`, started {state['started']}, {status}; **{_minutes(total)}** of stages in all.",
        "", f"Machine: {machine()}.", "", "## Figures", "", "| stage | figure | value |", "|---|---|---:|",
    ]  # fmt: skip
    md += [f"| {stage} | {name} | {value} |" for stage, name, value in figures(plan, out)]
    md += ["", "## Stages", "", "| # | stage | wall time |", "|---:|---|---:|"]
    md += [f"| {i} | {s.title} | {_minutes(done[s.name]['seconds']) if s.name in done else NOT_YET} |"
           for i, s in enumerate(todo, 1)]  # fmt: skip
    md += ["", "Each stage by hand, in order (its output is in `logs/STAGE.log`):", "", "```bash"]
    md += [f"{s.command()}   # {s.name}" for s in todo]
    md += ["```", "", "## Samples", "", f"The pretrained model, from `{plan.chat.base_prompt}`:", "", "```"]
    md += [log_text(out, "sample") or NOT_YET, "```", "", "The chatbot (greedy):", ""]
    md += conversation(plan, out)
    md += ["## Curves", ""]
    md += [f"![{run}]({run}/curves.png)" for run in ("base", "sft", "rl") if (out / run / "curves.png").is_file()]
    path = out / "REPORT.md"
    path.write_text("\n".join(md) + "\n")
    return path
