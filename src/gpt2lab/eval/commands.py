"""`gpt2lab eval ...`: load the model once, run the chosen benchmarks, print tables, write JSON.

Under torchrun every rank loads the model, scores its share of the examples and the sums are
all-reduced (NCCL on GPUs, gloo on CPU); rank 0 prints and writes the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib

from gpt2lab.data.shards import write_json
from gpt2lab.eval.common import format_table
from gpt2lab.runtime.dist import DistInfo, destroy_distributed, init_distributed, print0
from gpt2lab.tokenizer.bpe import Tokenizer

TASKS = ("hellaswag", "wikitext2", "lambada", "loss")


def _data(args: argparse.Namespace, task: str):
    """The data argument of a task: ``--data`` for a single task; ``--TASK-data`` (or --data for loss) in ``all``."""
    if args.task != "all" or task == "loss":
        return args.data
    return getattr(args, f"{task}_data", None)


def _run_task(task: str, model, tokenizer: Tokenizer, args: argparse.Namespace, info: DistInfo) -> dict:
    common = dict(batch_size=args.batch_size, rank=info.rank, world_size=info.world_size)
    if task == "hellaswag":
        from gpt2lab.eval.hellaswag import run_hellaswag

        return run_hellaswag(model, tokenizer, info.device, _data(args, task), args.limit, **common)
    if task == "lambada":
        from gpt2lab.eval.lambada import run_lambada

        return run_lambada(model, tokenizer, info.device, _data(args, task), args.limit, **common)
    if task == "wikitext2":
        from gpt2lab.eval.wikitext import run_wikitext

        limit = args.limit_lines if args.task == "all" else args.limit
        return run_wikitext(
            model, tokenizer, info.device, _data(args, task), limit, args.context, args.stride, **common
        )
    from gpt2lab.eval.loss import run_loss
    from gpt2lab.interop.tokenizer_match import check_same, data_tokenizer_record, record_of

    shards = f"the shards of {args.data} were made with"
    check_same(record_of(tokenizer), data_tokenizer_record(args.data), f"the model {args.model}", shards)
    if args.rope_scaling is not None or (args.seq_len or 0) > model.config.block_size:  # loss runs last in `all`
        from gpt2lab.inference.generate import extend_context

        extend_context(model.config, args.seq_len or model.config.block_size, args.rope_scaling or "none")
    return run_loss(
        model, info.device, args.data, args.split, seq_len=args.seq_len, max_batches=args.max_batches, **common
    )


def _check_inputs(args: argparse.Namespace, tasks: list[str]) -> None:
    """Find every task's data before the model loads, so a wrong path fails in a second, not after an hour."""
    from pathlib import Path

    from gpt2lab.errors import Gpt2LabError

    for task in tasks:
        if task == "loss":
            from gpt2lab.data.shards import read_manifest

            read_manifest(args.data)
            continue
        module = {"hellaswag": "hellaswag", "wikitext2": "wikitext", "lambada": "lambada"}[task]
        path = Path(importlib.import_module(f"gpt2lab.eval.{module}").locate(_data(args, task)))
        if not path.is_file():
            raise Gpt2LabError(f"{path}: no such file")


def _summary(results: dict) -> list[tuple[str, object]]:
    keys = {"hellaswag": ("acc", "acc_norm"), "wikitext2": ("ppl", "bpb", "ppl_token"), "lambada": ("acc", "ppl"),
            "loss": ("loss", "ppl", "bpb")}  # fmt: skip
    return [(f"{task} {k}", results[task][k]) for task in TASKS if task in results for k in keys[task]]


def eval_command(args: argparse.Namespace) -> int:
    from gpt2lab.interop.load import load_model
    from gpt2lab.interop.tokenizer_match import model_tokenizer

    tasks = [t for t in TASKS if t != "loss" or args.data] if args.task == "all" else [args.task]
    _check_inputs(args, tasks)
    info = init_distributed(args.device)
    try:
        tokenizer = model_tokenizer(args.model, args.tokenizer)  # the model's own: benchmarks are re-tokenized with it
        model = load_model(args.model, info.device, args.dtype)
        results: dict = {
            "model": args.model,
            "device": info.device,
            "world_size": info.world_size,
            "dtype": args.dtype or "float32" + (" (bf16 autocast)" if info.device.startswith("cuda") else ""),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        print0(f"model {args.model} on {info.device} x{info.world_size}, {model.num_params():,} parameters")
        for task in tasks:
            results[task] = _run_task(task, model, tokenizer, args, info)
        if len(tasks) > 1:
            print0(format_table(f"Summary: {args.model}", _summary(results)))
        if args.json and info.is_main:
            write_json(args.json, results)
            print0(f"wrote {args.json}")
    finally:
        destroy_distributed()
    return 0
