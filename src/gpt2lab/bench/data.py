"""`gpt2lab bench data`: tokenization throughput (1 worker vs all cores) and loader batches/s.

Tokenization runs the real ``prepare`` pipeline (``files`` source) on a .jsonl of ~4 KB documents
(about FineWeb-Edu's mean) cut from Tiny Shakespeare repeated to ``--mb`` MB: once in-process with
1 worker (no pickling: the honest single-core baseline), once with a pool of ``--workers``
processes. Runs alternate and the best of each is kept, so load from others hits both alike.
tiktoken's ``encode_ordinary`` is single-threaded (only its ``encode_batch`` uses threads, and
prepare does not call it), so the 1-worker run really uses one core. Besides wall-clock time the
table reports the CPU seconds of all processes: on cores that other users keep busy, the wall-clock
ratio measures the neighbours, while ``1-worker CPU s / (parallel CPU s / cores)`` is the speed-up
on free cores, with every cost of the parallel run (pool start, pickling, the main process) counted.
The loader reads a synthetic 2-shard dataset of random token ids (32M tokens) with shuffling on,
B x T int64 batches on the CPU; the target is 50x the step rate of GPT-2 124M on an H100 (0.12 s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from gpt2lab.data.loader import ShardLoader
from gpt2lab.data.prepare import Settings, load_tokenizer, prepare
from gpt2lab.data.shards import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, shard_name, write_json, write_shard
from gpt2lab.data.sources import read_text
from gpt2lab.errors import Gpt2LabError
from gpt2lab.mirror import mirror_dir

H100_STEP_S = 0.12  # GPT-2 124M, 0.5M-token batch, on one H100 (llm.c / nanoGPT reproduction)
DOC_CHARS = 4000  # about the mean FineWeb-Edu document (~1,000 tokens)


def _bench_corpus(folder: Path, mb: float, mirror: str | None) -> tuple[Path, int]:
    """Tiny Shakespeare repeated to about ``mb`` MB as a .jsonl of ~4 KB documents; its path and text bytes."""
    root = mirror_dir(mirror)
    src = root / "tinyshakespeare" / "input.txt" if root else None
    if src is None or not src.is_file():
        raise Gpt2LabError("gpt2lab bench data reads tinyshakespeare/input.txt from the mirror: set GPT2LAB_MIRROR")
    docs, current = [], ""
    for block in read_text(src).split("\n\n"):  # whole speeches, packed to FineWeb-Edu's typical document size
        current = f"{current}\n\n{block}" if current else block
        if len(current) >= DOC_CHARS:
            docs.append(current)
            current = ""
    docs.append(current)
    copies = max(1, round(mb * 1e6 / sum(len(d.encode()) for d in docs)))
    path = folder / "bench.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return path, copies * sum(len(d.encode()) for d in docs)


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its finished children (the workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _time_prepare(corpus: Path, out: Path, workers: int) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (all processes) and tokens of one complete prepare run into a fresh folder."""
    for f in out.glob("*"):
        f.unlink()
    settings = Settings("files", shard_size=10_000_000, val_tokens=100_000, paths=[str(corpus)])
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    manifest = prepare(settings, out, workers=workers, quiet=True)  # the pool is shut down (workers reaped) on return
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return seconds, cpu, sum(s["tokens"] for s in manifest["splits"].values())


def _synthetic_dataset(folder: Path, tokens_per_shard: int = 16_000_000) -> None:
    """Two shards of random token ids and their manifest."""
    rng = np.random.default_rng(0)
    shards = []
    for i in range(2):
        tokens = rng.integers(0, 50257, tokens_per_shard, dtype=np.uint16)
        sha = write_shard(folder / shard_name("train", i), tokens)
        shards.append({"file": shard_name("train", i), "tokens": tokens_per_shard, "sha256": sha})
    write_json(
        folder / MANIFEST,
        {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "source": "synthetic",
            "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eot": 50256},
            "splits": {"train": {"tokens": 2 * tokens_per_shard, "shards": shards}},
        },
    )


def bench_loader(folder: Path, batch_size: int, seq_len: int, batches: int) -> float:
    """Batches per second of ShardLoader.next_batch on the CPU (after a few warm-up batches)."""
    loader = ShardLoader(folder, "train", batch_size, seq_len, shuffle=True, seed=0)
    for _ in range(5):
        loader.next_batch()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches / (time.perf_counter() - t0)


def bench_data_command(args: argparse.Namespace) -> int:
    workers = args.workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="gpt2lab-bench-data-") as tmp:
        tmp = Path(tmp)
        corpus, nbytes = _bench_corpus(tmp, args.mb, args.mirror)
        (tmp / "out").mkdir()
        what = f"{nbytes / 1e6:.1f} MB (Tiny Shakespeare repeated, ~4 KB documents)"
        print(f"tokenizing {what}, 1 worker vs {workers}, best of 2 each")
        print(
            f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other users' work on these cores)"
        )
        load_tokenizer()  # once, before timing: prepare reuses it and forked workers inherit it
        best: dict[int, tuple[float, float, int]] = {}
        for _ in range(2):
            for w in (1, workers):  # alternate, so a busy neighbour slows both alike
                run = _time_prepare(corpus, tmp / "out", w)
                if w not in best or run[0] < best[w][0]:
                    best[w] = run
        print("| workers | wall s | CPU s | MB/s | tokens/s | speed-up (wall) | speed-up on free cores |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for w in (1, workers):
            seconds, cpu, tokens = best[w]
            free = best[1][1] / max(cpu / min(w, os.cpu_count() or 1), 1e-9)
            row = f"| {w} | {seconds:.2f} | {cpu:.2f} | {nbytes / 1e6 / seconds:.2f} | {tokens / seconds:,.0f} |"
            print(f"{row} {best[1][0] / seconds:.2f}x | {free:.2f}x |")
        print(
            "speed-up on free cores = CPU s of 1 worker / (CPU s of the parallel run / cores): the wall-clock speed-up "
            "when no one else uses the cores (the main process's reading and writing included)"
        )
        (tmp / "loader").mkdir()
        _synthetic_dataset(tmp / "loader")
        rate = bench_loader(tmp / "loader", args.batch_size, args.seq_len, args.batches)
        need = 50 / H100_STEP_S
        mtok = rate * args.batch_size * args.seq_len / 1e6
        print(f"\nloader: B={args.batch_size} T={args.seq_len}: {rate:,.0f} batches/s = {mtok:,.1f}M tokens/s")
        print(f"target (50x a {H100_STEP_S} s H100 step): {need:,.0f} batches/s -> {rate / need:.1f}x the target")
    return 0
