"""Command line: argument parsing and dispatch only; the work is done in the modules.

Each subcommand is a parser-builder plus a handler that imports its module lazily (so
``gpt2lab --help`` stays fast) and calls one function. A ``Gpt2LabError`` anywhere becomes
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from gpt2lab import __version__
from gpt2lab.chat.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from gpt2lab.errors import Gpt2LabError

DTYPES = ["float32", "bfloat16", "float16"]  # --dtype's choices (gpt2lab.interop.load.DTYPES, without importing torch)
TOKENIZER_HELP = "default: the model's own; or gpt2, a folder holding tokenizer.json, or encoder.json + vocab.bpe"

# ----------------------------------------------------------------------------- sample / export


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a model, streaming tokens as they come")
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hugging Face folder, or a checkpoint")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--num-samples", type=int, default=1, help="samples drawn from the same prompt")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample (>= 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same samples (default: random)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.add_argument("--context", type=int, default=None, help="tokens the model reads (default: its block size)")
    p.add_argument(
        "--rope-scaling", default=None, choices=["none", "linear", "yarn"],
        help="RoPE models past their trained context: yarn, linear (position interpolation) or none (extrapolate)",
    )  # fmt: skip
    p.add_argument(
        "--decode", default="auto", choices=["auto", "eager", "static", "graph"],
        help="how each token step runs: eager (dynamic KV cache), static (static cache), graph (CUDA graph); "
        "auto: graph on CUDA, else eager",
    )  # fmt: skip
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from gpt2lab.inference.generate import sample_command

    return sample_command(args)


def add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as a Hugging Face folder (GPT-2, Llama, Qwen3, MoE, DeepSeek-V3)",
        description="Write a checkpoint as a Hugging Face folder that transformers loads. The family follows the "
        "model's [model] switches (interop.hf.export_hf): GPT-2 (the defaults), Llama (RoPE, RMSNorm, SwiGLU, no "
        "bias), Qwen3 (+ qk_norm), Qwen3-MoE or Mixtral (mixture of experts), DeepSeek-V3 (attention = mla); a "
        "model that is none of them is refused, naming the switch.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="a gpt2lab checkpoint or run folder (or any --model spec)")
    p.add_argument("out_dir", help="the Hugging Face folder to write")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP + " (copied)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from gpt2lab.interop.hf import export_command
    from gpt2lab.interop.load import load_model
    from gpt2lab.interop.tokenizer_match import model_tokenizer

    tokenizer = model_tokenizer(args.checkpoint, args.tokenizer, load_gpt2=False)  # None: GPT-2's, looked up there
    code = export_command(args, load_model(args.checkpoint), tokenizer)
    from gpt2lab.chat.export import add_chat_files

    add_chat_files(args.checkpoint, args.out_dir)  # a model from gpt2lab sft: special tokens, chat_template, eos
    return code


def add_consolidate(sub) -> None:
    p = sub.add_parser("consolidate", help="gather a sharded (FSDP) checkpoint into a plain model.safetensors folder")
    p.add_argument("checkpoint", help="a gpt2lab checkpoint, or a run folder (its newest checkpoint)")
    p.add_argument("out_dir", help="the checkpoint folder to write (model.safetensors + config.json)")
    p.set_defaults(func=run_consolidate)


def run_consolidate(args: argparse.Namespace) -> int:
    from gpt2lab.train.dcp import consolidate

    consolidate(args.checkpoint, args.out_dir)
    return 0


# ----------------------------------------------------------------------------- data (issue: data)


def add_data(sub) -> None:
    from gpt2lab.rl.tasks import ARITH_DIGITS  # a light module (no torch): one default for data, eval and rl

    p = sub.add_parser("data", help="tokenize a text source into shards; describe a prepared dataset")
    dsub = p.add_subparsers(dest="data", required=True)
    prep = dsub.add_parser("prepare", help="tokenize a source into llm.c-format shards plus manifest.json")
    prep.add_argument("source", choices=["shakespeare", "fineweb-edu", "files", "gutenberg"], help="what to tokenize")
    prep.add_argument("paths", nargs="*", help="files: glob patterns ('corpus/*.jsonl'); gutenberg: a folder of books")
    prep.add_argument("--out", default=None, help="dataset folder to write (default: data/SOURCE)")
    prep.add_argument("--mirror", default=None, help="offline data folder laid out like ../shared/data")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    prep.add_argument("--tokenizer", default="gpt2", help="gpt2, or a folder holding tokenizer.json (tokenizer train)")
    prep.add_argument("--shard-size", type=int, default=None, help="tokens per shard (fineweb-edu 100M, else 10M)")
    prep.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    prep.add_argument(
        "--val-tokens", type=int, default=None,
        help="val size in tokens, whole documents (default: files min(1M, ~10%%), fineweb-edu one shard)",
    )  # fmt: skip
    prep.add_argument("--text-field", default="text", help=".jsonl/.parquet field holding the text")
    prep.add_argument("--blank-line-docs", action="store_true", help=".txt: a document per blank-line block")
    prep.add_argument("--val-books", type=int, default=4, help="gutenberg: books held out as val")
    prep.set_defaults(func=run_data_prepare)
    info = dsub.add_parser("info", help="print a prepared dataset's manifest summary and check its shards")
    info.add_argument("dir", help="a dataset folder (holds manifest.json)")
    info.add_argument("--verify", action="store_true", help="also check sha256 checksums and token ids")
    info.set_defaults(func=run_data_info)
    index = dsub.add_parser("index", help="write manifest.json for a folder of llm.c shards")
    index.add_argument("dir", help="a folder of llm.c .bin shards (NAME_train_000001.bin, NAME_val_000000.bin...)")
    index.set_defaults(func=run_data_index)
    arith = dsub.add_parser("arith", help="write synthetic arithmetic conversations (JSONL) for gpt2lab sft")
    arith.add_argument("--out", required=True, help="the JSONL file to write")
    arith.add_argument("--n", type=int, default=5000, help="conversations (train-split problems)")
    arith.add_argument("--digits", type=int, default=ARITH_DIGITS, help="digits per operand")
    arith.add_argument("--ops", default="+", help="operations drawn from: +, * or +*")
    arith.add_argument(
        "--thinking", nargs="?", type=float, const=1.0, default=0.0, metavar="SHARE",
        help="the worked solution as the reply's thinking span (in a SHARE of them, e.g. 0.25; alone: all)",
    )  # fmt: skip
    arith.set_defaults(func=run_data_arith)


def run_data_arith(args: argparse.Namespace) -> int:
    from gpt2lab.rl.tasks import write_arith_conversations

    return write_arith_conversations(args.out, args.n, args.digits, args.ops, args.thinking)


def run_data_prepare(args: argparse.Namespace) -> int:
    from gpt2lab.data.prepare import prepare_command

    return prepare_command(args)


def run_data_info(args: argparse.Namespace) -> int:
    from gpt2lab.data.info import info_command

    return info_command(args)


def run_data_index(args: argparse.Namespace) -> int:
    from gpt2lab.data.info import index_command

    return index_command(args)


# ----------------------------------------------------------------------------- tokenizer (issue 15)


def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train your own byte-level BPE tokenizer; compare tokenizers")
    tsub = p.add_subparsers(dest="tokenizer", required=True)
    tr = tsub.add_parser("train", help="train a byte-level BPE (Hugging Face tokenizers) on a corpus")
    tr.add_argument("corpus", nargs="+", help="a source (shakespeare, gutenberg [DIR], ...) or globs ('corpus/*.txt')")
    tr.add_argument("--out", required=True, help="folder to write tokenizer.json and gpt2lab_tokenizer.json into")
    tr.add_argument("--vocab-size", type=int, default=16384, help="all tokens, the 13 special ones included")
    tr.add_argument("--pattern", default="gpt4", choices=["gpt2", "gpt4"], help="pre-tokenisation split regex")
    tr.add_argument("--max-chars", type=int, default=None, help="train on the corpus's first N characters")
    tr.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are never merged")
    tr.add_argument("--name", default=None, help="the name shards and runs record (default: the --out folder's)")
    tr.add_argument("--mirror", default=None, help="offline data folder laid out like ../shared/data")
    tr.add_argument("--force", action="store_true", help="overwrite a tokenizer already in --out")
    tr.set_defaults(func=run_tokenizer_train)
    cmp = tsub.add_parser("compare", help="bytes per token, tokens per document and speed on held-out text")
    cmp.add_argument("tokenizers", nargs="+", help="gpt2, or folders holding tokenizer.json")
    cmp.add_argument(
        "--on", nargs="+", required=True, metavar="CORPUS",
        help="a source (its val split: gutenberg's held-out books, shakespeare's last 10%%), wikitext2 (the mirror's "
        "test file, by article) or file globs",
    )  # fmt: skip
    cmp.add_argument("--max-chars", type=int, default=None, help="compare on the first N held-out characters")
    cmp.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    cmp.add_argument("--mirror", default=None, help="offline data folder laid out like ../shared/data")
    cmp.set_defaults(func=run_tokenizer_compare)


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from gpt2lab.tokenizer.train import train_command

    return train_command(args)


def run_tokenizer_compare(args: argparse.Namespace) -> int:
    from gpt2lab.tokenizer.train import compare_command

    return compare_command(args)


# ----------------------------------------------------------------------------- train / plot (issue: training)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a GPT from a TOML config (works under torchrun too)")
    p.add_argument("config", nargs="?", help="a TOML preset, e.g. configs/shakespeare.toml (optional with --resume)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from gpt2lab.train.command import train_command

    return train_command(args)


def add_plot(sub) -> None:
    p = sub.add_parser(
        "plot", help="draw a run's loss, HellaSwag, learning rate and throughput to a PNG; several runs: compare them"
    )
    p.add_argument("run_dir", nargs="+", help="run folders holding metrics.jsonl; the first sets the target loss")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png; several runs: compare.png)")
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from gpt2lab.report.plot import plot_command

    return plot_command(args)


def add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="train a base config and variants of it, then compare them (tokens to target)")
    p.add_argument("config", help="the base TOML preset, e.g. configs/shakespeare.toml (the first row, 'base')")
    p.add_argument(
        "--variant", action="append", default=[], metavar="NAME:SECTION.KEY=VALUE[,...]",
        help="a variant of the base, e.g. relu2:model.mlp=relu2,model.qk_norm=true (repeat for more)",
    )  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every run")
    p.add_argument("--runs-dir", default=None, help="folder of the runs, one per variant (default: runs/ablate-NAME)")
    p.add_argument("--out", default=None, help="PNG path of the comparison (default: RUNS_DIR/compare.png)")
    p.set_defaults(func=run_ablate)


def run_ablate(args: argparse.Namespace) -> int:
    from gpt2lab.train.ablate import ablate_command

    return ablate_command(args)


# ----------------------------------------------------------------------------- eval (issue: evaluation)


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
    from gpt2lab.rl.tasks import ARITH_DIGITS  # the default of gpt2lab data arith and rl.digits too

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


# ----------------------------------------------------------------------------- bench


def add_bench_sample(bsub) -> None:
    p = bsub.add_parser("sample", help="decoding tokens/s: gpt2lab's KV cache vs transformers' generate")
    p.add_argument("--model", default=None, help="any --model spec (default: random GPT-2 124M, no download)")
    p.add_argument("--new-tokens", type=int, default=100, help="tokens generated per sample")
    p.add_argument("--prompt-tokens", type=int, default=16, help="length of the (random) prompt")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="samples per call; one row each")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (outputs compared)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each implementation first")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--decode", nargs="+", default=["eager"], choices=["eager", "static", "graph"],
                   help="gpt2lab decoding modes to time (see gpt2lab sample --decode)")  # fmt: skip
    p.add_argument("--compare", action="store_true", help="time eager against graph (CUDA) or static (CPU) decoding")
    p.set_defaults(func=run_bench_sample)


def run_bench_sample(args: argparse.Namespace) -> int:
    from gpt2lab.bench.sample import bench_sample

    return bench_sample(args)


def add_bench_serve(bsub) -> None:
    p = bsub.add_parser("serve", help="gpt2lab serve's aggregate tokens/s and time to first token vs clients")
    p.add_argument("--model", default=None, help="any --model spec (default: random GPT-2 124M, no download)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent clients per level")
    p.add_argument("--requests", type=int, default=2, help="streaming requests each client sends in turn")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--max-batch", type=int, default=32, help="the engine's batch (gpt2lab serve --max-batch)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(func=run_bench_serve)


def run_bench_serve(args: argparse.Namespace) -> int:
    from gpt2lab.bench.serve import bench_serve

    return bench_serve(args)


def add_bench_data(bsub) -> None:
    p = bsub.add_parser("data", help="tokenization throughput (1 worker vs all cores) and loader batches/s")
    p.add_argument("--mb", type=float, default=64.0, help="MB of text to tokenize (Tiny Shakespeare repeated)")
    p.add_argument("--workers", type=int, default=None, help="parallel workers to compare with 1 (default: all cores)")
    p.add_argument("--batch-size", type=int, default=64, help="loader rows per batch")
    p.add_argument("--seq-len", type=int, default=1024, help="loader tokens per row")
    p.add_argument("--batches", type=int, default=500, help="loader batches to time")
    p.add_argument("--mirror", default=None, help="offline data folder laid out like ../shared/data")
    p.set_defaults(func=run_bench_data)


def run_bench_data(args: argparse.Namespace) -> int:
    from gpt2lab.bench.data import bench_data_command

    return bench_data_command(args)


def add_bench_train(bsub) -> None:
    p = bsub.add_parser("train", help="training throughput: tokens/s, ms/step, MFU, peak memory, compile on/off")
    p.add_argument("--config", default="configs/gpt2-124m.toml", help="a TOML preset")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", default="both", choices=["both", "on", "off"], help="variants to time")
    p.add_argument("--compare", action="store_true", help="time the plain path against the config's [perf] switches")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per timed step (total_batch is ignored)")
    p.set_defaults(func=run_bench_train)


def run_bench_train(args: argparse.Namespace) -> int:
    from gpt2lab.bench.train import bench_train_command

    return bench_train_command(args)


def add_bench_eval(bsub) -> None:
    p = bsub.add_parser("eval", help="HellaSwag examples/s: batched vs one example / one candidate per forward")
    p.add_argument("--model", default=None, help="any --model spec (default: GPT-2 124M with random weights)")
    p.add_argument("--data", default=None, metavar="FILE", help="a HellaSwag jsonl (default: official, else mirror)")
    p.add_argument("--limit", type=int, default=20, help="HellaSwag examples per measurement")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward in the batched mode")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    p.set_defaults(func=run_bench_eval)


def run_bench_eval(args: argparse.Namespace) -> int:
    from gpt2lab.bench.eval import bench_eval_command

    return bench_eval_command(args)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: speed of sampling, data, training, evaluation")
    bsub = p.add_subparsers(dest="bench", required=True)
    for add in (add_bench_sample, add_bench_data, add_bench_train, add_bench_eval, add_bench_serve):
        add(bsub)


# ----------------------------------------------------------------------------- chat: sft / chat (issue 13)


def add_sft(sub) -> None:
    p = sub.add_parser("sft", help="fine-tune a model on conversations into a chat model (the training loop's SFT)")
    p.add_argument("config", nargs="?", default=None, help="optional TOML with an [sft] section (and [train], ...)")
    p.add_argument("--model", default=None, help="the model to fine-tune: run folder, checkpoint, HF folder or name")
    p.add_argument("--data", action="append", default=[], help="conversations PATH or PATH:WEIGHT (repeatable)")
    p.add_argument("--run-dir", default=None, help="where the run is written (default: runs/chat)")
    p.add_argument("--thinking", action="store_true", help="GSM8K: the solution as a thinking span (sft.thinking)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.set_defaults(func=run_sft)


def run_sft(args: argparse.Namespace) -> int:
    from gpt2lab.sft.command import sft_command

    return sft_command(args)


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to a chat model in the terminal (streamed, multi-turn)")
    p.add_argument("--model", required=True, help="a run folder from gpt2lab sft, a checkpoint or an exported folder")
    p.add_argument("--system", default=None, help="the system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy (serve's default too)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same replies (default: random)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from gpt2lab.chat.terminal import chat_command

    return chat_command(args)


def add_rl(sub) -> None:
    p = sub.add_parser("rl", help="train a chat model with rewards from a verifier (GRPO, the training loop's RL)")
    p.add_argument("config", nargs="?", default=None, help="optional TOML with an [rl] section (and [train], ...)")
    p.add_argument("--model", default=None, help="the policy: a chat model (a gpt2lab sft run, checkpoint, export)")
    p.add_argument("--task", default=None, help="gsm8k, arith, or a JSONL of prompts and answers")
    p.add_argument("--run-dir", default=None, help="where the run is written (default: runs/rl)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.set_defaults(func=run_rl)


def run_rl(args: argparse.Namespace) -> int:
    from gpt2lab.rl.command import rl_command

    return rl_command(args)


def add_serve(sub) -> None:
    from gpt2lab.serve.limits import ServeLimits

    d = ServeLimits()
    p = sub.add_parser("serve", help="an OpenAI-compatible API and a chat web page (http://127.0.0.1:8000)")
    p.add_argument("--model", required=True, help="a run folder from gpt2lab sft, a checkpoint or an exported folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (beyond this machine: needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 (or GPT2LAB_API_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true", help="serve a non-local address without a key")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from ORIGIN (repeatable)")
    p.add_argument(
        "--served-model-name", default=None, help="the model id in /v1/models and responses (default: the run's name)"
    )
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a slot; beyond: 503")
    p.add_argument(
        "--max-tokens", type=int, default=d.max_tokens, help="most new tokens per request (default: context)"
    )
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens, help="when a request gives none")
    p.add_argument("--max-n", type=int, default=d.max_n, help="most choices per request")
    p.add_argument("--max-top-k", type=int, default=d.max_top_k, help="largest top_k a request may ask for")
    p.add_argument("--max-messages", type=int, default=d.max_messages, help="most messages per request")
    p.add_argument("--max-message-chars", type=int, default=d.max_message_chars, help="longest message")
    p.add_argument("--max-total-chars", type=int, default=d.max_total_chars, help="all messages (or the prompt)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (else 413)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    levels = ["critical", "error", "warning", "info", "debug"]
    p.add_argument("--log-level", default="info", choices=levels, help="the server log's level")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from gpt2lab.serve.server import serve_command

    return serve_command(args)


# ----------------------------------------------------------------------------- main

SUBCOMMANDS = [
    add_sample, add_export, add_consolidate, add_data, add_tokenizer, add_train, add_plot, add_ablate, add_eval,
    add_bench, add_sft, add_chat, add_serve, add_rl,
]  # fmt: skip


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in --help, except where there is none to show or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        nothing = action.default is None or action.default is False or action.default in ("", [])
        if nothing or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subparsers (built with the parser's own class) all show defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpt2lab", description="Reproduce GPT-2 from scratch, then go past it.")
    parser.add_argument("--version", action="version", version=f"gpt2lab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # under torchrun every rank meets the same error: rank 0 alone says so (all exit with the code)
    speak = int(os.environ.get("RANK", "0")) == 0
    try:
        return args.func(args) or 0
    except Gpt2LabError as e:
        if speak:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if speak:
            print("interrupted", file=sys.stderr)
        return 130
