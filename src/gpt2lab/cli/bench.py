"""Subcommand `gpt2lab bench`: the speed of sampling, data, training, evaluation and serving.

Each handler imports its benchmark lazily, so building the parser stays light.
"""

from __future__ import annotations

import argparse

from gpt2lab.cli.options import DTYPES


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
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per engine step (serve's option)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.add_argument("--long-request", type=int, default=None, metavar="K",
                   help="instead: K streams of a tiny model (unless --model), then one 256-message/128,000-character "
                        "chat request; report the longest gap in the streams' tokens meanwhile")  # fmt: skip
    p.add_argument("--turns", type=int, default=None, metavar="T",
                   help="instead: max(--clients) conversations of T turns under a long system prompt, served with "
                        "the prefix cache and without")  # fmt: skip
    p.add_argument("--long-prompt", type=int, default=None, metavar="N",
                   help="with --long-request K: the big request is one N-token prompt to the served model (GPT-2 "
                        "124M): its prefill's longest gap against one chunk's time")  # fmt: skip
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
