"""Sampling: temperature, top-k, top-p (nucleus), a KV cache, and streaming to the terminal.

The engine works on token ids; the tokenizer is applied at the edges (``sample_command``).
``generate`` prefills the prompt into a ``KVCache`` once, then decodes one token per step,
so each new token costs O(context). Only the last position's hidden state goes through the
LM head (the prompt's other logits are never needed), and the padded vocabulary rows are
sliced off before sampling, so they can never be drawn.

Context rule: a prompt longer than ``block_size`` keeps its last ``block_size`` tokens (with a
warning). When prompt + new tokens reach ``block_size``, the window slides: the cache is rebuilt
from the last half of the context, then decoding goes on one token at a time (nanoGPT instead
re-runs the full window at every step; the cost here stays O(context) per token on average).

Filtering conventions (the same as Hugging Face's ``TopKLogitsWarper``/``TopPLogitsWarper``):
- top-k keeps every token whose logit is >= the k-th largest, so ties at the boundary are kept;
- top-p keeps the smallest set of most likely tokens whose probabilities sum to >= p
  (Holtzman et al., 2020), at least one token, plus any token tied with the last one kept.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Sequence

import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.kv_cache import KVCache
from gpt2lab.inference.sampling import draw_uniform, sample_rows, seeded_generator
from gpt2lab.model.gpt import GPT, softcap
from gpt2lab.tokenizer.bpe import EOT_ID

# ----------------------------------------------------------------------------- filtering (pure)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (..., V) with all but the k largest per row set to -inf (ties at the k-th value kept)."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits (..., V) restricted to the nucleus: the fewest top tokens with total probability >= p."""
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass strictly above each token
    n_keep = (before < p).sum(dim=-1, keepdim=True).clamp(min=1)  # (..., 1); the first token always counts
    threshold = sorted_probs.gather(-1, n_keep - 1)  # probability of the last token kept
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits (B, V): argmax when temperature is 0, else a filtered draw whose
    randomness comes from ``generator`` (a CPU one; the global generator when None), B numbers per call."""
    B = logits.size(0)
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_rows(
        logits, torch.full((B,), float(temperature)), torch.full((B,), top_k or 0, dtype=torch.long),
        torch.full((B,), 1.0 if top_p is None else float(top_p)), draw_uniform(generator, B),
    )  # fmt: skip


def check_sampling_args(
    num_samples: int, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """Raise Gpt2LabError naming the first impossible sampling setting."""
    if num_samples < 1:
        raise Gpt2LabError(f"--num-samples must be >= 1 (got {num_samples})")
    if max_new_tokens < 0:
        raise Gpt2LabError(f"--max-new-tokens must be >= 0 (got {max_new_tokens})")
    if not temperature >= 0:  # also rejects NaN
        raise Gpt2LabError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
    if top_k is not None and top_k < 1:
        raise Gpt2LabError(f"--top-k must be >= 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise Gpt2LabError(f"--top-p must be in (0, 1] (got {top_p})")


def fit_context(
    prompt_ids: Sequence[int], block_size: int, max_new_tokens: int, eos_id: int | None = EOT_ID
) -> tuple[list[int], list[str]]:
    """(prompt ids the model will see, warnings): the prompt's last block_size tokens.

    An empty prompt becomes [eos_id] (<|endoftext|>, the token GPT-2 saw between documents).
    """
    notes = []
    ids = list(prompt_ids)
    if not ids:
        if eos_id is None:
            raise Gpt2LabError("the prompt is empty and there is no <|endoftext|> token to start from")
        ids = [eos_id]
    if len(ids) > block_size:
        notes.append(f"the prompt has {len(ids)} tokens; keeping its last {block_size} (the model's context)")
        ids = ids[-block_size:]
    if len(ids) + max_new_tokens > block_size:
        notes.append(
            f"prompt + new tokens exceed the context of {block_size}; past it the model sees a sliding "
            f"window of the last {block_size - block_size // 2} to {block_size} tokens"
        )
    return ids, notes


# ----------------------------------------------------------------------------- the engine

DECODE_MODES = ("auto", "eager", "static", "graph")


def resolve_decode(decode: str, device: str | torch.device) -> str:
    """The mode to run: "auto" is the CUDA graph on CUDA (2.9-3.9x eager on an H200, same tokens), else eager."""
    if decode != "auto":
        return decode
    return "graph" if torch.device(device).type == "cuda" else "eager"


def head_for_decoding(model: GPT, steps: int) -> torch.Tensor:
    """The LM head as a (C, vocab_size) matrix: padded rows dropped, transposed.

    On CPU a contiguous transposed copy makes decoding faster: MKL's matrix-vector product over
    the (C, V) layout took half the time of the (V, C) weight at batch 1 (5.7 vs 11.5 ms for
    GPT-2's 768 x 50257 head, 1 thread; `gpt2lab bench sample` shows the net effect). The copy
    takes about as long as 25 decoding steps of the head and one head of memory while it runs,
    so it is made only for longer generations. On GPU the strided view is as fast.
    """
    head = model.lm_head.weight[: model.config.vocab_size].t()  # (C, V)
    return head.contiguous() if head.device.type == "cpu" and steps >= 32 else head


def last_logits(model: GPT, idx: torch.Tensor, cache: KVCache, head: torch.Tensor) -> torch.Tensor:
    """Logits (B, vocab_size) of the last position only; the prompt's other logits are never needed."""
    hidden = model.forward_hidden(idx, cache)[:, -1]  # (B, C)
    return softcap(hidden @ head, model.config.logit_softcap)  # (B, V)


def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    num_samples: int = 1,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = EOT_ID,
    decode: str = "auto",
) -> Iterator[list[int | None]]:
    """An iterator that yields, at each step, the new token of every sample (None once a sample has ended).

    All samples continue the same prompt. A sample ends after yielding ``eos_id``
    (<|endoftext|>; None disables stopping); the loop ends when every sample has.
    The same seed gives the same samples (for the same device and dtype). Pass a model
    in eval mode (``load_model`` returns one), or dropout stays on. When the text reaches
    block_size, the cache is rebuilt from the last half of the context (one prefill every
    block_size // 2 tokens), so generation can go on.

    ``decode`` picks how each one-token step runs, all computing the same logits: "eager"
    (dynamic KV cache), "static" (static KV cache), "graph" (static cache, the step replayed
    as a CUDA graph: no per-kernel launch cost; CUDA only), "auto" (graph on CUDA, else eager).
    """
    # Checks and warnings happen here, at the call, not at the first next(): a caller that prints
    # the prompt and then iterates gets them before any text, never in the middle of it.
    check_sampling_args(num_samples, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    check_decode(decode, device)
    decode = resolve_decode(decode, device)
    ids, notes = fit_context(prompt_ids, model.config.block_size, max_new_tokens, eos_id)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return _decode(model, ids, num_samples, max_new_tokens, temperature, top_k, top_p, seed, eos_id, decode)


def check_decode(decode: str, device: str | torch.device) -> None:
    """Raise Gpt2LabError if the decoding mode is unknown or cannot run on device."""
    if decode not in DECODE_MODES:
        raise Gpt2LabError(f"decode must be one of {', '.join(DECODE_MODES)} (got {decode!r})")
    if decode == "graph" and torch.device(device).type != "cuda":
        raise Gpt2LabError("CUDA-graph decoding needs a CUDA device (use --decode eager or static)")


@torch.inference_mode()
def _decode(
    model: GPT,
    ids: list[int],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    eos_id: int | None,
    decode: str,
) -> Iterator[list[int | None]]:
    """The decoding loop of ``generate``, for a prompt that already fits the context."""
    if max_new_tokens == 0:
        return
    block_size = model.config.block_size
    param = next(model.parameters())
    generator = seeded_generator(seed)  # on the CPU: a seed samples the same tokens on every device
    B, T = num_samples, len(ids)
    max_len = min(block_size, T + max_new_tokens)
    cache = KVCache(model.config, B, max_len, param.device, param.dtype, static=decode != "eager")
    tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=param.device)  # prompt + new
    tokens[:, :T] = torch.tensor(ids, dtype=torch.long, device=param.device)
    done = [False] * B
    head = head_for_decoding(model, max_new_tokens)
    step_fn = GraphedStep(model, cache, head) if decode == "graph" else None
    logits = last_logits(model, tokens[:, :T], cache, head)  # prefill: the whole prompt in one pass
    filled = T  # positions in the cache (counted here: reading a static cache's position would sync)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        tokens[:, T + step] = token
        new = token.tolist()
        yield [None if d else t for t, d in zip(new, done)]
        done = [d or t == eos_id for t, d in zip(new, done)]
        if all(done) or step == max_new_tokens - 1:
            return
        if filled < cache.max_len:  # decode: one position per step
            logits = step_fn(token) if step_fn else last_logits(model, token.unsqueeze(1), cache, head)
            filled += 1
        else:  # context full: slide the window, re-prefilling the last half of the context
            cache.reset()
            end, filled = T + step + 1, block_size - block_size // 2
            logits = last_logits(model, tokens[:, end - filled : end], cache, head)


class GraphedStep:
    """The one-token decoding step captured once as a CUDA graph over a static KV cache.

    At batch 1 a GPT-2 step is a few hundred small kernels, and the GPU waits on Python and
    kernel launches rather than on arithmetic; a replayed graph launches them all at once.
    It works because a static cache keeps every step's shapes fixed and holds its position
    in a tensor the graph advances itself. Inputs go in through ``self.idx``; the logits come
    out in ``self.logits`` (overwritten by the next replay).
    """

    def __init__(self, model: GPT, cache: KVCache, head: torch.Tensor):
        if not cache.static or cache.k.device.type != "cuda":
            raise Gpt2LabError("CUDA-graph decoding needs a CUDA device (use --decode eager or static)")
        self.model, self.cache, self.head = model, cache, head
        self.idx = torch.zeros(cache.k.size(1), 1, dtype=torch.long, device=cache.k.device)  # (B, 1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _capture(self) -> None:
        pos = self.cache.pos_t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph, as CUDA graph capture requires
            for _ in range(2):
                last_logits(self.model, self.idx, self.cache, self.head)
                self.cache.pos_t.copy_(pos)  # undo the warm-up's advance (its cache write is redone)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the cache and position are untouched
            self.logits = last_logits(self.model, self.idx, self.cache, self.head)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after feeding token (B,) at the cache's position."""
        self.idx.copy_(token.unsqueeze(1))
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits


def generate_ids(model: GPT, prompt_ids: Sequence[int], **kwargs) -> list[list[int]]:
    """The new tokens of every sample as lists (each ends with eos_id if it stopped there)."""
    samples: list[list[int]] | None = None
    for step in generate(model, prompt_ids, **kwargs):
        samples = samples or [[] for _ in step]
        for sample, token in zip(samples, step):
            if token is not None:
                sample.append(token)
    return samples or [[] for _ in range(kwargs.get("num_samples", 1))]


# ----------------------------------------------------------------------------- text at the edges


class TextStream:
    """Turns a sample's token ids into printable text, holding back split UTF-8 characters.

    GPT-2's byte-level BPE can split one character (an emoji, an accented letter) over
    several tokens; text is released only once it no longer ends in a replacement char.
    """

    def __init__(self, tokenizer, eos_id: int | None = EOT_ID, marks: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.marks = marks or {}  # special tokens shown as this text (a calculator call's <<, =, >>)
        self.pending: list[int] = []
        self.text = ""  # everything released so far

    def push(self, token: int) -> str:
        """Add one token; return the text that became printable (maybe empty)."""
        if token == self.eos_id:
            return self.flush()
        if token in self.marks:
            return self.flush() + self._release(self.marks[token])
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd"):
            return ""
        return self._release(piece)

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character decodes as U+FFFD)."""
        return self._release(self.tokenizer.decode(self.pending)) if self.pending else ""

    def _release(self, piece: str) -> str:
        self.pending = []
        self.text += piece
        return piece


def _print_single(steps: Iterator[list[int | None]], prompt: str, stream: TextStream) -> None:
    out = sys.stdout
    out.write(prompt)
    out.flush()
    for step in steps:
        if step[0] is not None:
            out.write(stream.push(step[0]))
            out.flush()
    out.write(stream.flush() + "\n")
    out.flush()


def _print_blocks(steps: Iterator[list[int | None]], prompt: str, streams: list[TextStream]) -> None:
    """Not a terminal: stream sample 1 in its block, then print the others' blocks."""
    out = sys.stdout
    out.write(f"--- sample 1 ---\n{prompt}")
    out.flush()
    for step in steps:
        for stream, token in zip(streams, step):
            if token is not None:
                piece = stream.push(token)
                if stream is streams[0]:
                    out.write(piece)
        out.flush()
    out.write(streams[0].flush() + "\n")
    for i, stream in enumerate(streams[1:], start=2):
        stream.flush()
        out.write(f"--- sample {i} ---\n{prompt}{stream.text}\n")
    out.flush()


def _print_live(steps: Iterator[list[int | None]], prompt: str, streams: list[TextStream]) -> None:
    """A terminal: a rich Live view with one growing panel per sample, then the final panels."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

    console = Console()

    def view() -> Group:
        panels = []
        for i, s in enumerate(streams, start=1):
            body = Text(prompt, style="bold") + Text(s.text)
            panels.append(Panel(body, title=f"sample {i}", title_align="left"))
        return Group(*panels)

    # transient: the live view may be cropped to the screen; the final panels are printed in full
    with Live(view(), console=console, refresh_per_second=12, transient=True) as live:
        for step in steps:
            for stream, token in zip(streams, step):
                if token is not None:
                    stream.push(token)
            live.update(view())
    for s in streams:
        s.flush()
    console.print(view())


def check_device(device: str) -> str:
    """The device string, or a clear error if it is malformed or not present on this machine."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise Gpt2LabError(f"--device {device!r} is not a device (try cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise Gpt2LabError(f"--device {device}: CUDA is not available on this machine")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise Gpt2LabError(f"--device {device}: MPS is not available on this machine")
    return device


def extend_context(config, context: int, scaling: str) -> None:
    """Let a RoPE model read `context` tokens, past the context it was trained at, with this RoPE scaling.

    The factor is context / trained context (YaRN: Peng et al. 2023; linear: position interpolation);
    "none" extrapolates plain RoPE. The config is changed in place: the model reads it at each step.
    """
    if context < 1:
        raise Gpt2LabError(f"--context must be >= 1 (got {context})")
    if config.pos_embedding != "rope":
        if context > config.block_size or scaling != "none":
            raise Gpt2LabError(
                f"--context {context} / --rope-scaling {scaling}: this model has learned position embeddings "
                f"for {config.block_size} positions and no RoPE to scale"
            )
        return
    original = config.rope_original_context or config.block_size
    config.rope_original_context = original
    config.rope_scaling, config.rope_factor = scaling, max(1.0, context / original) if scaling != "none" else 1.0
    config.block_size = context


def sample_command(args: argparse.Namespace) -> int:
    """`gpt2lab sample`: load a model and tokenizer, then stream samples to stdout.

    Every check and warning comes before the first character of text, each on its own stderr
    line, so stdout holds the text alone and a warning never lands in the middle of it.
    """
    from gpt2lab.interop.load import load_model
    from gpt2lab.interop.tokenizer_match import model_tokenizer
    from gpt2lab.runtime.dist import default_device

    if args.max_new_tokens < 1:  # 0 would print the prompt and nothing else, which nobody asks for
        raise Gpt2LabError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    check_sampling_args(args.num_samples, args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = check_device(args.device or default_device())
    check_decode(args.decode, device)
    tokenizer = model_tokenizer(args.model, args.tokenizer)  # GPT-2's, or the one the model was trained with
    model = load_model(args.model, device, args.dtype)
    if args.context is not None or args.rope_scaling is not None:
        extend_context(model.config, args.context or model.config.block_size, args.rope_scaling or "none")
    prompt_ids = tokenizer.encode(args.prompt)
    ids, _ = fit_context(prompt_ids, model.config.block_size, args.max_new_tokens)  # generate warns
    prompt = args.prompt if len(ids) >= len(prompt_ids) else tokenizer.decode(ids)  # what the model sees
    with warnings.catch_warnings():  # generate's warnings (context cropping) as one plain line each
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr, flush=True)
        steps = generate(
            model,
            prompt_ids,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            eos_id=tokenizer.eot,
            decode=args.decode,
        )
    streams = [TextStream(tokenizer, tokenizer.eot) for _ in range(args.num_samples)]
    if args.num_samples == 1:
        _print_single(steps, prompt, streams[0])
    elif sys.stdout.isatty():
        _print_live(steps, prompt, streams)
    else:
        _print_blocks(steps, prompt, streams)
    return 0
