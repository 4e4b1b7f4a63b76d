"""Does the whole GPU path work here? One script, one PASS/FAIL line per check, exit 1 on any failure.

Run it first on a GPU you rent, from the repository root, with a prepared dataset:

    gpt2lab data prepare gutenberg --out data/gutenberg --max-tokens 12000000   # or any prepared dataset
    python scripts/gpu_check.py --data data/gutenberg

It runs the real commands, as a user types them, on GPT-2 124M with the preset's settings (bf16
autocast, torch.compile, fused AdamW, flash attention):
- train 30 steps, checkpoint, sample and evaluate inside the loop: the loss goes down and the compiled
  training graph is never recompiled (TORCH_LOGS=recompiles prints nothing);
- the same run split in two: 15 steps under torchrun (the DDP/NCCL path), then resumed without it to
  step 30: both halves follow the uninterrupted run's loss curve;
- 15 steps with FSDP2 under torchrun (one rank; bf16 parameters by its mixed-precision policy on CUDA):
  the same curve within 3%;
- HellaSwag on a few hundred examples (the mirror's text-derived file, or --hellaswag);
- greedy samples with --decode eager, static and graph: the same tokens;
- each architecture variant for a few steps, compiled, then decoded with its KV cache (eager and
  CUDA graph: the same tokens), RoPE models past their context with YaRN, a Llama-shaped variant
  exported to a Hugging Face folder and sampled back from it.
``--quick`` shrinks every model to a toy, to try the script itself on a CPU in a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESUME_RTOL = 1e-2  # bf16 autocast and atomics in the backward pass: losses agree to ~1e-3, not bitwise
FSDP_RTOL = 3e-2  # FSDP's bf16 parameters (its mixed-precision policy) against autocast's float32 ones; a guess
PROMPT = "The meaning of life is"
LEARNS = 0.1  # nats the loss must fall: a run whose weights never move stays within a few hundredths

VARIANTS = {  # name: [model] switches (each in README's table)
    "modern-block": "pos_embedding=rope norm=rmsnorm qk_norm=true mlp=relu2".split(),
    "llama": "pos_embedding=rope norm=rmsnorm mlp=swiglu n_kv_head=4 bias=false tie_embeddings=false".split(),
    "mqa-gelu": ["n_kv_head=1"],
    "moe": "pos_embedding=rope norm=rmsnorm mlp=swiglu bias=false n_experts=8 experts_per_token=2 "
    "moe_router=sigmoid n_shared_experts=1".split(),
    "mla": "attention=mla pos_embedding=rope norm=rmsnorm mlp=swiglu bias=false".split(),
}
TOKENS_PER_STEP = "train.total_batch=65536"  # one micro-batch of 64 x 1024: the check needs no accumulation
QUICK = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=64",
    "model.block_size=64",
    "train.micro_batch=4",
    "train.total_batch=256",
]


class Checks:
    """PASS/FAIL lines as they come, every command's output in one log."""

    def __init__(self, out: Path):
        self.out, self.failed, self.results = out, 0, []
        self.log = (out / "gpu_check.log").open("w")

    def report(self, name: str, ok: bool, detail: str) -> bool:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        self.failed += not ok
        self.results.append({"check": name, "pass": ok, "detail": detail})
        return ok

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
        self.log.write(f"\n$ {' '.join(cmd)}\n# {time.time() - start:.1f} s, exit {proc.returncode}\n")
        self.log.write(proc.stdout + proc.stderr)
        self.log.flush()
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
            self.report(name, False, f"exit {proc.returncode}: {tail[0]}")
        return proc


def gpt2lab(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt2lab", *args]


def sets(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def loss_goes_down(c: Checks, name: str, losses: dict[int, float]) -> None:
    steps = sorted(losses)
    first, last = losses[steps[0]], sum(losses[s] for s in steps[-3:]) / 3
    c.report(name, last < first - LEARNS, f"loss {first:.3f} at step {steps[0]} -> {last:.3f} (mean of the last 3)")


def same_curve(
    c: Checks, name: str, ours: dict[int, float], reference: dict[int, float], steps: range, rtol: float = RESUME_RTOL
) -> None:
    worst = max(abs(ours[s] - reference[s]) / abs(reference[s]) for s in steps)
    c.report(name, worst <= rtol, f"steps {steps.start}-{steps.stop - 1}: largest relative difference {worst:.1e}")


def no_recompiles(c: Checks, name: str, proc: subprocess.CompletedProcess) -> None:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "Recompiling function" in line]
    c.report(name, not lines, "no recompilation" if not lines else f"{len(lines)} recompilations: {lines[0][:200]}")


def greedy(c: Checks, name: str, model: Path | str, *extra: str) -> str | None:
    proc = c.run(name, gpt2lab("sample", "--model", str(model), "--prompt", PROMPT, "--temperature", "0",
                               "--max-new-tokens", "48", *extra))  # fmt: skip
    return proc.stdout if proc.returncode == 0 else None


def same_tokens(c: Checks, name: str, texts: dict[str, str | None]) -> None:
    if any(t is None for t in texts.values()):
        return  # the failed command was reported
    first = next(iter(texts.values()))
    ok = all(t == first for t in texts.values()) and len(first) > len(PROMPT)
    c.report(name, ok, f"{' = '.join(texts)}: {first.strip()[:80]!r}" if ok else f"differ: {texts}")


def check_gpt2(c: Checks, args: argparse.Namespace, runs: Path) -> Path:
    """GPT-2 124M: train, resume under another launcher, evaluate, decode three ways."""
    base = ["configs/gpt2-124m.toml", *sets([f"data.path={args.data}", TOKENS_PER_STEP, "optim.warmup_steps=10",
            "optim.decay_steps=30", "eval.val_every=15", "eval.val_batches=4", "eval.sample_every=15",
            "train.save_every=15", *(QUICK if args.quick else [])])]  # fmt: skip
    full, split = runs / "gpt2", runs / "gpt2-split"
    watch = {"TORCH_LOGS": "recompiles"}
    proc = c.run("train 124M", gpt2lab("train", *base, *sets(["train.max_steps=30"]), "--run-dir", str(full)), watch)
    if proc.returncode != 0:
        return full
    print(proc.stdout.splitlines()[0], flush=True)  # the run's header: parameters, device, batch
    reference = train_losses(full)
    loss_goes_down(c, "train 124M", reference)
    no_recompiles(c, "compiled graph kept through val, samples and checkpoints", proc)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "gpt2lab"]
    first = c.run("torchrun 124M", [*torchrun, "train", *base, *sets(["train.max_steps=15"]), "--run-dir", str(split)])
    if first.returncode == 0:
        same_curve(c, "torchrun (DDP, NCCL) follows the same curve", train_losses(split), reference, range(1, 16))
        resumed = c.run("resume", gpt2lab("train", "--resume", str(split), *sets(["train.max_steps=30"])), watch)
        if resumed.returncode == 0:
            same_curve(c, "resume continues the curve", train_losses(split), reference, range(16, 31))
    fsdp_run, fsdp_sets = runs / "gpt2-fsdp", sets(["train.max_steps=15", "train.parallel=fsdp"])
    fsdp = c.run("torchrun fsdp 124M", [*torchrun, "train", *base, *fsdp_sets, "--run-dir", str(fsdp_run)])
    if fsdp.returncode == 0:
        name = "FSDP2 (bf16 mixed precision on CUDA) follows the same curve"
        same_curve(c, name, train_losses(fsdp_run), reference, range(1, 16), rtol=FSDP_RTOL)
    hs_args = ["--limit", str(args.hellaswag_limit), "--json", str(runs / "hellaswag.json")]
    hs_args += ["--data", args.hellaswag] if args.hellaswag else []
    hs = c.run("hellaswag", gpt2lab("eval", "hellaswag", "--model", str(full), *hs_args))
    if hs.returncode == 0:
        scores = json.loads((runs / "hellaswag.json").read_text())["hellaswag"]
        detail = f"acc {scores['acc']:.3f}, acc_norm {scores['acc_norm']:.3f} on {scores['count']} examples"
        c.report("hellaswag", True, detail)
    modes = ("eager", "static", "graph") if not args.quick else ("eager", "static")
    same_tokens(
        c, "decode eager/static/graph", {m: greedy(c, f"sample --decode {m}", full, "--decode", m) for m in modes}
    )
    return full


def check_variants(c: Checks, args: argparse.Namespace, runs: Path) -> None:
    """Each architecture switch: compiled training steps, KV-cache decoding, export where a family matches."""
    small = ["model.n_layer=4", "train.max_steps=8", "optim.warmup_steps=2", "optim.decay_steps=8", "eval.val_every=0"]
    common = [f"data.path={args.data}", TOKENS_PER_STEP, "train.save_every=8", *small, *(QUICK if args.quick else [])]
    graph = "graph" if not args.quick else "static"
    for name, switches in VARIANTS.items():
        if args.variants and name not in args.variants:
            continue
        run = runs / name
        switches_set = sets(common + [f"model.{s}" for s in switches])
        proc = c.run(f"train {name}", gpt2lab("train", "configs/gpt2-124m.toml", *switches_set, "--run-dir", str(run)))
        if proc.returncode != 0:
            continue
        loss_goes_down(c, f"train {name}", train_losses(run))
        texts = {m: greedy(c, f"sample {name} --decode {m}", run, "--decode", m) for m in ("eager", graph)}
        same_tokens(c, f"decode {name}", texts)
        if "pos_embedding=rope" in switches:
            context = str(128 if args.quick else 2048)
            longer = greedy(
                c, f"sample {name} --rope-scaling yarn", run, "--context", context, "--rope-scaling", "yarn"
            )
            c.report(f"sample {name} past its context with YaRN", longer is not None, f"--context {context}")
        if name == "llama":
            out = runs / "llama-hf"
            if c.run("export llama", gpt2lab("export", str(run), str(out))).returncode == 0:
                same_tokens(
                    c,
                    "llama exported and sampled back",
                    {"run": texts["eager"], "export": greedy(c, "sample export", out)},
                )
    if args.variants:
        return
    run = runs / "modern-124m"
    proc = c.run(
        "train modern-124m", gpt2lab("train", "configs/modern-124m.toml", *sets(common), "--run-dir", str(run))
    )
    if proc.returncode == 0:
        loss_goes_down(c, "train modern-124m", train_losses(run))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared dataset folder (gpt2lab data prepare ...)")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the runs, the log and results.json")
    p.add_argument("--hellaswag", help="a HellaSwag jsonl (default: official, else the mirror's)")
    p.add_argument("--hellaswag-limit", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="toy models: try the script itself on a CPU")
    p.add_argument("--only", choices=("gpt2", "variants"), help="run one group of checks")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="only these architecture variants")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = Checks(out)
    start = time.time()
    if args.only in (None, "gpt2"):
        check_gpt2(c, args, out)
    if args.only in (None, "variants"):
        check_variants(c, args, out)
    (out / "results.json").write_text(json.dumps(c.results, indent=1))
    print(f"{len(c.results) - c.failed} passed, {c.failed} failed in {time.time() - start:.0f} s; log: {c.log.name}")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
