"""RL on the CPU, end to end: a tiny model learns arithmetic by SFT, then `gpt2lab rl` raises its reward.

BENCHMARKS.md's "RL" figures come from this script. Every stage is a `gpt2lab` command (printed as it runs),
in one folder OUT:

    1. gpt2lab data arith --thinking SHARE    conversations, a SHARE of them reasoning first (the rest answer);
                                              --digits/--ops (default 2-digit addition) reach every stage
    2. gpt2lab tokenizer train                a small BPE on their text, so the LM head stays small
    3. a random base model, gpt2lab sft       N_LAYER x N_EMBD, 128-token context, the tokenizer beside it
    4. gpt2lab eval arith                     greedy and sampled accuracy on held-out problems
    5. gpt2lab rl, gpt2lab eval arith         the same, after RL
    6. gpt2lab plot                           OUT/rl/curves.png

and prints a table (also OUT/summary.json). ``--sft RUN`` starts at stage 4 from an SFT run made before
(another RL setting from the same start). With the defaults it takes about 20 minutes on one core:

    python scripts/rl_arith.py --out runs/rl-arith

With ``--thinking 0.5`` (the default) the SFT model reasons first in about half of its sampled replies and
answers at once in the rest, where it is right far less often. RL rewards the answer alone, and the policy
learns to think. ``--thinking 1`` and ``--thinking 0`` are the one-way runs of the comparison.

With ``--tool`` the answers go through the calculator (``gpt2lab data arith --tool``: ``<<47+29=76>>76``, SFT with
``sft.calculator=tool``): the model writes the call, the engine forces the result. Run it with and without
``--tool`` at the same ``--n-layer``/``--n-embd`` to compare the accuracy after SFT and after RL, e.g. on 3-digit
products: ``--digits 3 --ops '*' --thinking 0``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, save_model
from gpt2lab.cli.main import main
from gpt2lab.inference.tools import split_calls
from gpt2lab.interop.tokenizer_match import record_of
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import TrainedTokenizer


def run(*argv: str) -> None:
    print("\n$ gpt2lab " + " ".join(argv), flush=True)
    if main(list(argv)) != 0:
        sys.exit(f"gpt2lab {argv[0]} failed")


def write_corpus(conversations: Path, corpus: Path) -> None:
    """The conversations' text, one message per line: what the tokenizer learns its merges from. A calculator
    call's expression and result are lines of their own (tokenised apart, between the call's special tokens)."""
    with corpus.open("w") as f:
        for line in conversations.read_text().splitlines():
            for message in json.loads(line)["messages"]:
                text = "\n".join(filter(None, [message.get("reasoning_content"), message["content"]]))
                pieces = split_calls(text)
                f.write("\n".join(p if isinstance(p, str) else "\n".join(p) for p in pieces) + "\n")


def make_base(tokenizer_dir: Path, out: Path, n_layer: int, n_embd: int) -> None:
    """A randomly initialised model that reads and writes the trained tokenizer (its files beside the weights)."""
    tok = TrainedTokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=128, vocab_size=tok.n_vocab, padded_vocab_size=(tok.n_vocab + 63) // 64 * 64,
                    n_layer=n_layer, n_head=4, n_embd=n_embd)  # fmt: skip
    save_model(GPT(cfg), out, extra={TRAIN_STATE_KEY: {"tokenizer": record_of(tok)}})
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, out / f.name)


def evaluate(model: Path, result: Path, args: argparse.Namespace, max_new: int) -> dict:
    run("eval", "arith", "--model", str(model), "--digits", str(args.digits), "--ops", args.ops, "--limit",
        str(args.eval_limit), "--max-new-tokens", str(max_new), "--temperature", "1", "--samples", "8",
        "--json", str(result))  # fmt: skip
    r = json.loads(result.read_text())
    return {"greedy": r["pass@1"], "sampled": r["sampled_pass@1"], "pass@8": r["pass@8"],
            "sampled_think_tokens": r["sampled_think_tokens"]}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the folder every stage writes into (replaced)")
    p.add_argument("--digits", type=int, default=2, help="digits per operand (data, eval and rl.digits)")
    p.add_argument("--ops", default="+", help="operations drawn from: +, * or +* (data, eval and rl.ops)")
    p.add_argument("--thinking", type=float, default=0.5, help="share of the SFT conversations that reason first")
    p.add_argument("--n", type=int, default=20000, help="SFT conversations")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--rl-steps", type=int, default=150)
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--eval-limit", type=int, default=200, help="held-out problems of the final evaluations")
    p.add_argument("--tool", action="store_true", help="answers through the calculator (data arith --tool, "
                   "sft.calculator=tool)")  # fmt: skip
    p.add_argument("--sft", default=None, metavar="RUN", help="start RL from this SFT run (stages 1-3 skipped; give "
                   "its --thinking and --tool too: 0 caps replies at 16 tokens, else 96; --tool adds 16)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more settings for gpt2lab rl")
    return p.parse_args(argv)


def sft_stages(args: argparse.Namespace, out: Path) -> Path:
    """Stages 1-3: the conversations, a tokenizer, a base model and its SFT run (OUT/sft)."""
    data = out / "arith.jsonl"
    tool = ["--tool"] if args.tool else []
    run("data", "arith", "--out", str(data), "--n", str(args.n), "--digits", str(args.digits), "--ops", args.ops,
        "--thinking", str(args.thinking), *tool)  # fmt: skip
    write_corpus(data, out / "corpus.txt")
    run("tokenizer", "train", str(out / "corpus.txt"), "--out", str(out / "tokenizer"), "--vocab-size", "512")
    make_base(out / "tokenizer", out / "base", args.n_layer, args.n_embd)
    sft = [f"train.max_steps={args.sft_steps}", "sft.lr=3e-3", "train.micro_batch=32",
           f"train.save_every={args.sft_steps}", "log.every=50", "eval.val_every=0",
           *(["sft.calculator=tool"] if args.tool else [])]  # fmt: skip
    run("sft", "--model", str(out / "base"), "--data", str(data), "--run-dir", str(out / "sft"),
        *[a for s in sft for a in ("--set", s)])  # fmt: skip
    return out / "sft"


def pipeline(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if args.sft and out.resolve() in Path(args.sft).resolve().parents:
        sys.exit(f"--sft {args.sft} is inside --out {out}, which is replaced: copy it elsewhere first")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # a direct answer is a few tokens (a 3-digit product: 6 digits and the end); a worked one about 56 (2-digit sums)
    # to 85 (3-digit products); a calculator call and its forced output about 10 more (a 3-digit product: 15 in all)
    max_new = (16 if args.thinking == 0 else 96) + (16 if args.tool else 0)
    sft_run = Path(args.sft) if args.sft else sft_stages(args, out)
    before = evaluate(sft_run, out / "eval-sft.json", args, max_new)
    rl = [f"rl.digits={args.digits}", f"rl.ops={args.ops}", f"train.max_steps={args.rl_steps}",
          "rl.prompts_per_step=8", "rl.group_size=8", "train.micro_batch=16", f"rl.max_new_tokens={max_new}",
          f"rl.lr={args.rl_lr}", "rl.eval_every=20", "rl.eval_problems=100", "rl.eval_samples=4",
          f"train.save_every={args.rl_steps}", *args.set]  # fmt: skip
    run("rl", "--model", str(sft_run), "--task", "arith", "--run-dir", str(out / "rl"),
        *[a for s in rl for a in ("--set", s)])  # fmt: skip
    after = evaluate(out / "rl", out / "eval-rl.json", args, max_new)
    run("plot", str(out / "rl"))
    summary = {"settings": vars(args), "after_sft": before, "after_rl": after}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def table(summary: dict) -> str:
    rows = ["| stage | greedy pass@1 | sampled pass@1 (T = 1) | pass@8 | thinking tokens (sampled) |",
            "|---|---:|---:|---:|---:|"]  # fmt: skip
    for stage in ("after_sft", "after_rl"):
        r = summary[stage]
        rows.append(f"| {stage.replace('_', ' ')} | {r['greedy']:.1%} | {r['sampled']:.1%} | {r['pass@8']:.1%} | "
                    f"{r['sampled_think_tokens']:.1f} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    print("\n" + table(pipeline(parse_args())))
