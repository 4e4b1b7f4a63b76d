"""`gpt2lab bench sample`: decoding speed of gpt2lab's KV-cache sampler against transformers.

Both run the same weights (random GPT-2 124M by default, or any ``--model``), from the same
prompt, for the same number of new tokens (eos disabled on both sides), greedy by default.
Runs alternate between the implementations (the order reversed every other round) and the median
time is reported, so a shared machine's load hits all alike; each speed-up is the median of the
per-run ratios with a distribution-free interval (``gpt2lab.bench.stats``), or "no measurable
difference" when that interval covers 1.00. tok/s counts new tokens of all samples (batch x new tokens)
over the whole call, prefill included. Greedy outputs are also compared token for token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from gpt2lab.bench.stats import ratio
from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.generate import generate_ids
from gpt2lab.inference.kv_cache import KVCache
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT


def to_transformers(model: GPT):
    """The transformers model that `gpt2lab export` makes of this one (GPT-2, Llama, Qwen3, DeepSeek-V3), same
    weights, device and dtype, in eval mode; a model no transformers class implements is refused, naming the switch."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise Gpt2LabError("gpt2lab bench sample compares against transformers: pip install 'gpt2lab[hf]'") from None
    from gpt2lab.interop.hf import export_hf

    param = next(model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)  # the conversion `gpt2lab export` does, tested against transformers per family
        hf, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise RuntimeError(f"weight conversion mismatch: {info}")
    return hf.to(device=param.device, dtype=param.dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def bench_batch(model: GPT, hf_model, prompt: list[int], batch: int, new_tokens: int, args) -> dict:
    """Median seconds of gpt2lab and transformers for one batch size, and whether greedy outputs agree."""
    device = next(model.parameters()).device
    greedy = args.temperature == 0
    idx = torch.tensor([prompt] * batch, device=device)  # (B, T)

    def ours(decode: str) -> Callable[[], list[list[int]]]:
        kw = dict(temperature=args.temperature, top_k=args.top_k, seed=0, eos_id=None, decode=decode)
        return lambda: generate_ids(model, prompt, num_samples=batch, max_new_tokens=new_tokens, **kw)

    def theirs():
        kw = dict(do_sample=False)
        if not greedy:
            kw = dict(do_sample=True, top_k=args.top_k or 0, temperature=args.temperature)
        with torch.inference_mode():
            out = hf_model.generate(
                idx,
                attention_mask=torch.ones_like(idx),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                use_cache=True,
                pad_token_id=hf_model.config.eos_token_id,
                **kw,
            )
        return out[:, len(prompt) :].tolist()

    runners = {f"gpt2lab {mode}": ours(mode) for mode in args.decode} | {"transformers": theirs}
    times: dict[str, list[float]] = {name: [] for name in runners}
    peak: dict[str, float | None] = {}
    outputs = {}
    runs = args.warmup + args.repeats
    for i in range(runs):
        order = list(runners.items())
        for name, fn in order[::-1] if i % 2 else order:  # reversed every other round: no order bias
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, outputs[name] = _timed(fn, device)
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            if i >= args.warmup:
                times[name].append(seconds)
            kind = "warm-up" if i < args.warmup else "timed"
            # stderr, so the table on stdout stays clean; a long benchmark shows it is alive
            print(f"batch {batch}, {name}: run {i + 1}/{runs} ({kind}) {seconds:.2f} s", file=sys.stderr, flush=True)
    lengths = {len(s) for name in outputs for s in outputs[name]}
    if lengths != {new_tokens}:
        raise RuntimeError(f"unequal generation lengths {lengths}, expected {new_tokens}")
    same = all(out == outputs["transformers"] for out in outputs.values()) if greedy else None
    medians = {name: statistics.median(t) for name, t in times.items()}
    return medians | {"same_tokens": same, "peak": peak, "times": times}


def _build_model(args) -> GPT:
    from gpt2lab.interop.load import DTYPES, load_model

    if args.model is None:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("gpt2"))  # random GPT-2 124M: speed does not depend on weights
        return model.to(device=args.device, dtype=DTYPES[args.dtype or "float32"]).eval()
    return load_model(args.model, args.device, args.dtype)


def bench_sample(args: argparse.Namespace) -> int:
    """Print one table: per batch size and implementation, tok/s, ms/step, ratio, MFU, peak memory."""
    from rich.console import Console
    from rich.table import Table

    from gpt2lab.inference.generate import check_device
    from gpt2lab.runtime.dist import default_device

    args.device = check_device(args.device or default_device())
    if args.compare:  # the plain path against the fastest one for this device
        args.decode = ["eager", "graph" if args.device.startswith("cuda") else "static"]
    if args.new_tokens < 1 or args.prompt_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        raise Gpt2LabError("--new-tokens, --prompt-tokens and --repeats must be >= 1, --warmup >= 0")
    if any(b < 1 for b in args.batch_sizes):
        raise Gpt2LabError(f"--batch-sizes must be >= 1 (got {args.batch_sizes})")
    if args.threads is not None:
        if args.threads < 1:
            raise Gpt2LabError(f"--threads must be >= 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    model = _build_model(args).requires_grad_(False)
    if args.prompt_tokens + args.new_tokens > model.config.block_size:
        raise Gpt2LabError(
            f"--prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} exceeds the "
            f"context of {model.config.block_size}"
        )
    hf_model = to_transformers(model)
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, model.config.vocab_size - 1, (args.prompt_tokens,), generator=g).tolist()
    import transformers

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    console = Console(width=None if sys.stdout.isatty() else 160)  # no wrapping when piped or captured
    console.print(
        f"model {args.model or 'random gpt2 (124M)'}, {model.num_params(False) / 1e6:.0f}M params, "
        f"device {args.device}, {dtype}, {torch.get_num_threads()} threads, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens, {'greedy' if args.temperature == 0 else f'T={args.temperature}'}, "
        f"median of {args.repeats} after {args.warmup} warmup; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    heads, k_dim, v_dim = model.config.kv_cache_dims  # MLA: its latent and RoPE key, one each per token and layer
    kv_bytes = KVCache(model.config, 1, 1, device="meta", dtype=next(model.parameters()).dtype).bytes_per_token
    console.print(
        f"KV cache: {kv_bytes:,} bytes per token ({model.config.attention}: {model.config.n_layer} layers x {heads} "
        f"x ({k_dim} + {v_dim}) numbers x {next(model.parameters()).element_size()} bytes)"
    )
    from gpt2lab.train.loop import peak_flops

    peak_rate = peak_flops(args.device)
    flops_per_token = 2 * model.num_params()  # a forward pass: one multiply-add per weight
    table = Table("batch", "implementation", "tok/s", "ms/step", "vs transformers", "MFU", "peak memory",
                  "same tokens")  # fmt: skip
    verdicts = []
    for batch in args.batch_sizes:
        r = bench_batch(model, hf_model, prompt, batch, args.new_tokens, args)
        ours = [f"gpt2lab {mode}" for mode in args.decode]
        pairs = [("transformers", name) for name in ours] + [(ours[0], name) for name in ours[1:]]
        verdicts += [f"batch {batch}: " + ratio(r["times"][a], r["times"][b]).describe(a, b) for a, b in pairs]
        same = "-" if r["same_tokens"] is None else ("yes" if r["same_tokens"] else "no")
        theirs = batch * args.new_tokens / r["transformers"]
        for name in [*(f"gpt2lab {mode}" for mode in args.decode), "transformers"]:
            rate = batch * args.new_tokens / r[name]
            mfu = f"{flops_per_token * rate / peak_rate:.2%}" if peak_rate else "n/a"
            mem = f"{r['peak'][name]:.2f} GiB" if r["peak"][name] is not None else "n/a"
            table.add_row(
                str(batch), name, f"{rate:,.1f}", f"{1e3 * r[name] / args.new_tokens:.1f}",
                f"{rate / theirs:.2f}x", mfu, mem, same,
            )  # fmt: skip
    console.print(table)
    for line in verdicts:  # per-run ratios, interleaved: the spread says whether a gap is real
        console.print(line)
    return 0
