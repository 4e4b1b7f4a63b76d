"""Subcommand `gpt2lab eval`: HellaSwag, loss, WikiText-2, LAMBADA, all, and the generative GSM8K and arith.

Each handler imports its module lazily, so building the parser stays light.
"""

from __future__ import annotations

import argparse

from gpt2lab.cli.options import DTYPES, TOKENIZER_HELP


def _eval_common(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hugging Face folder, checkpoint or run")
    p.add_argument("--batch-size", type=int, default=8, help="examples (HellaSwag: 4 rows each) or windows per forward")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.set_defaults(func=run_eval, task=task)


def _eval_loss_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--data",
        required=required,
        default=None,
        metavar="DIR",
        help="a prepared dataset folder (from `gpt2lab data prepare`)" + ("" if required else " for loss"),
    )
    p.add_argument("--split", default="val", help="the split to score: train or val")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's block size)")
    p.add_argument("--max-batches", type=int, default=None, help="score only the first N batches per rank")
    p.add_argument(
        "--rope-scaling", default=None, choices=["none", "linear", "yarn"],
        help="a RoPE model read at a --seq-len past its trained context: yarn, linear or none (extrapolate)",
    )  # fmt: skip


def _eval_wikitext_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stride", type=int, default=512, help="sliding-window step in tokens (at most the window)")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's block size)")


def add_eval(sub) -> None:
    from gpt2lab.rl.arith import ARITH_DIGITS  # the default of gpt2lab data arith and rl.digits too

    p = sub.add_parser("eval", help="evaluate a model: HellaSwag, loss, WikiText-2, LAMBADA, all, GSM8K, arith")
    esub = p.add_subparsers(dest="eval", required=True)
    h = esub.add_parser("hellaswag", help="HellaSwag val accuracy (acc, acc_norm)")
    h.add_argument("--data", default=None, metavar="FILE", help="a HellaSwag jsonl (default: official, else mirror)")
    h.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    _eval_common(h, "hellaswag")
    lo = esub.add_parser("loss", help="mean token loss and perplexity over a prepared split")
    _eval_loss_args(lo, required=True)
    _eval_common(lo, "loss")
    w = esub.add_parser("wikitext2", help="WikiText-2 test perplexity with a sliding window")
    w.add_argument("--data", default=None, metavar="FILE", help="wiki.test.tokens (default: the mirror's)")
    w.add_argument("--limit", type=int, default=None, help="score only the first N lines of the file")
    _eval_wikitext_args(w)
    _eval_common(w, "wikitext2")
    la = esub.add_parser("lambada", help="LAMBADA last-word accuracy and perplexity")
    la.add_argument("--data", default=None, metavar="FILE", help="lambada_test.jsonl (default: the mirror's)")
    la.add_argument("--limit", type=int, default=None, help="score only the first N passages")
    _eval_common(la, "lambada")
    a = esub.add_parser("all", help="hellaswag, wikitext2 and lambada (+ loss with --data)")
    _eval_loss_args(a, required=False)
    a.add_argument("--limit", type=int, default=None, help="first N HellaSwag examples and LAMBADA passages")
    a.add_argument("--limit-lines", type=int, default=None, help="first N lines of WikiText-2")
    a.add_argument("--hellaswag-data", default=None, metavar="FILE", help="a HellaSwag jsonl (default: as hellaswag)")
    a.add_argument("--wikitext2-data", default=None, metavar="FILE", help="wiki.test.tokens (default: the mirror's)")
    a.add_argument("--lambada-data", default=None, metavar="FILE", help="lambada_test.jsonl (default: the mirror's)")
    _eval_wikitext_args(a)
    _eval_common(a, "all")
    g = esub.add_parser("gsm8k", help="GSM8K: the model writes answers, a verifier grades them (pass@1, pass@k)")
    g.add_argument("--data", default=None, metavar="PATH", help="a folder of train/test.jsonl (default: the mirror's)")
    _eval_generative_args(g)
    ar = esub.add_parser("arith", help="synthetic addition/multiplication, answers written and graded")
    ar.add_argument("--digits", type=int, default=ARITH_DIGITS, help="digits of each operand (the difficulty)")
    ar.add_argument("--ops", default="+", help="operators drawn from: +, *, or both (+*)")
    ar.add_argument("--task-seed", type=int, default=0, help="which problems (test never meets train, any seed)")
    _eval_generative_args(ar)


def _eval_generative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a chat model (run folder, checkpoint, HF folder); a base model "
                   "is asked in a plain User:/Assistant: transcript")  # fmt: skip
    p.add_argument("--split", default="test", choices=["train", "test"], help="the problems' split")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--samples", type=int, default=1, help="also N sampled replies per problem: pass@k up to k=N")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled replies (pass@1 is greedy)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest reply, thinking included (default, and at most: what the model's context leaves "
                   "after the prompt)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling seed (problem i uses seed + i)")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"],
                   help="chat template or plain transcript (auto: chat for a model from gpt2lab sft)")  # fmt: skip
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the results as JSON to PATH (no PATH: print JSON instead of the table)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.set_defaults(func=run_eval_generative)


def run_eval(args: argparse.Namespace) -> int:
    from gpt2lab.eval.commands import eval_command

    return eval_command(args)


def run_eval_generative(args: argparse.Namespace) -> int:
    from gpt2lab.eval.generative import generative_command

    return generative_command(args)
