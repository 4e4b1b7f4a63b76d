"""Generative evaluation (``gpt2lab eval gsm8k|arith``): the model writes replies, the task's verifier scores them.

Each problem's conversation is rendered with the chat template (``render_prompt``) and the model generates
until <|assistant_end|>; the reply is split into thinking and answer (``split_reply``) and the answer scored by
the task (``gpt2lab.rl.tasks``). A base model, never fine-tuned on the chat tokens, is asked in the plain
transcript "User: ...\\nAssistant:" (``render_plain_prompt``) and its reply ends where it starts the next
"\\nUser:" turn, as ``gpt2lab chat`` speaks to it: so a model before SFT has a number too.

Reported (over problems; greedy replies unless said):
- pass@1: greedy decoding, one reply per problem, the share scored right;
- with ``samples`` n >= 2, n more replies per problem at ``temperature``, and pass@k for k = 1, 2, 4, ..., n:
  the unbiased estimator of Chen et al. 2021 (the Codex paper), 1 - C(n-c, k) / C(n, k) with c of the n
  right, averaged over problems (``sampled_pass@1`` is the mean accuracy of a sample);
- format_rate: the share of replies whose answer parses (states a number, for GSM8K and arith);
- reply_tokens / think_tokens: mean tokens per reply (to its end marker) / inside its <think> span.
All of a rank's replies go through one decoding engine (``gpt2lab.inference.engine``): up to ``batch_size``
decoded together, a problem's greedy and sampled replies sharing one prefill of its prompt. Under torchrun each
rank generates for every world_size-th problem and the sums are all-reduced; sample j of problem i is seeded from
(seed + i, j), so the numbers do not depend on the number of ranks or on the batch.

Expected results: nanochat's d20 model (561M parameters) scores GSM8K pass@1 4.6% after SFT and 7.6% after RL
(its report); a GPT-2 124M base model answers almost none.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from gpt2lab.chat.template import PLAIN_STOP, render_plain_prompt, render_prompt, split_reply
from gpt2lab.data.shards import write_json
from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval.common import all_reduce_sum, format_table, raw_model
from gpt2lab.inference.engine import Engine, Sequence
from gpt2lab.inference.generate import check_sampling_args
from gpt2lab.inference.tools import Calculator
from gpt2lab.runtime.dist import destroy_distributed, init_distributed, print0

if TYPE_CHECKING:
    from gpt2lab.rl.scoring import Problem, Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k replies drawn from n (c of them right) is right: 1 - C(n-c, k)/C(n, k),
    as the product of Chen et al. 2021 (numerically stable for large n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n."""
    ks = [k for k in (2**i for i in range(n.bit_length())) if k <= n]
    return ks + ([n] if ks[-1] != n else [])


# ----------------------------------------------------------------------------- one reply


def reply_sequences(
    tokenizer, prompt: list[int], samples: int, temperature: float, budget: int, seed: int, chat: bool = True
) -> list[Sequence]:
    """The engine sequences of one problem: its greedy reply, then ``samples`` sampled ones (none for 1), each
    seeded from (seed, its index). A chat reply ends at <|assistant_end|>, a base model's at <|endoftext|> or at
    the "\nUser:" it writes (which stays in its tokens and is cut from the text by ``score_reply``)."""
    if chat:  # a chat model may call the calculator: it answers (inference.tools)
        ends, stop, tool = frozenset({tokenizer.special_id("<|assistant_end|>")}), None, Calculator(tokenizer)
    else:
        ends, tool = frozenset({tokenizer.eot}), None

        def stop(tokens: list[int]) -> bool:
            return PLAIN_STOP in tokenizer.decode(tokens[-8:])  # "\nUser:" is a few tokens

    def sequence(temperature: float, seed: int | None) -> Sequence:
        return Sequence(prompt, budget, temperature=temperature, seed=seed, end_ids=ends, stop=stop, tool=tool)

    sampled = [sequence(temperature, seed * 1_000_003 + j) for j in range(samples)] if samples > 1 else []
    return [sequence(0.0, None), *sampled]


@dataclass
class Scored:
    """One reply, read and scored."""

    reasoning: str | None
    answer: str
    parsed: str | None  # the answer the task read from it (None: unparseable)
    correct: bool
    reply_tokens: int
    think_tokens: int


def score_reply(ids: list[int], tokenizer, task: Task, problem: Problem, chat: bool = True) -> Scored:
    """Split a reply (ids from ``generate_replies``) into thinking and answer, and score the answer."""
    if chat:
        reasoning, answer = split_reply(ids, tokenizer)
        think_tokens = _think_tokens(ids, tokenizer)
        n_tokens = len(ids)
    else:
        reasoning, answer = None, tokenizer.decode(ids).split(PLAIN_STOP)[0]
        think_tokens, n_tokens = 0, len(tokenizer.encode_ordinary(answer))
    parsed, correct = task.check(answer, problem)
    return Scored(reasoning, answer, parsed, correct, n_tokens, think_tokens)


def _think_tokens(ids: list[int], tokenizer) -> int:
    """Tokens inside the reply's <think> span (to the end when it is never closed)."""
    think, end_think = tokenizer.special_id("<think>"), tokenizer.special_id("</think>")
    if think not in ids:
        return 0
    start = ids.index(think) + 1
    return (ids.index(end_think, start) if end_think in ids[start:] else len(ids)) - start


# ----------------------------------------------------------------------------- a split


def reply_budget(block_size: int, prompt_len: int, max_new_tokens: int | None = None) -> int:
    """Most tokens a reply to a prompt of prompt_len tokens may take: what the context leaves after the prompt
    (the whole context when the prompt alone fills it), and at most max_new_tokens (None: no more limit).
    A prompt that fills the context keeps its last half (``fit_prompt``), and the reply the other half."""
    room = block_size - prompt_len if prompt_len < block_size else block_size - block_size // 2
    return room if max_new_tokens is None else min(max_new_tokens, room)


def fit_prompt(prompt: list[int], block_size: int) -> list[int]:
    """The prompt, or its last half-context of tokens when it fills the context (counted as "cropped")."""
    return prompt if len(prompt) < block_size else prompt[-(block_size // 2) :]


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    split: str = "test",
    samples: int = 1,
    limit: int | None = None,
    *,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    chat: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    details: bool = False,
    batch_size: int = 16,
) -> dict:
    """pass@1 (greedy), pass@k from ``samples`` replies (>= 2), format rate and lengths over the first ``limit``
    problems of a split, summed over all ranks. Each reply stops where the context is full (``reply_budget``);
    with max_new_tokens given, the results count the replies it was cut for (capped_replies). ``details``: also
    this rank's replies, per problem. The replies are decoded ``batch_size`` at a time by one engine."""
    check_sampling_args(samples, max_new_tokens or 0, temperature, None, None)
    problems = task.problems(split, limit)
    net = raw_model(model)
    device = next(net.parameters()).device
    render = render_prompt if chat else render_plain_prompt
    ks = pass_ks(samples) if samples > 1 else []
    keys = ["count", "correct", "parsed", "reply_tokens", "think_tokens"]
    sums = dict.fromkeys(keys + [f"sampled_{k}" for k in keys] + [f"pass@{k}" for k in ks] + ["cropped", "capped"], 0.0)
    mine = range(rank, len(problems), world_size)
    jobs = []  # (problem index, its sequences: greedy first)
    for i in mine:
        prompt = render(problems[i].messages, tokenizer)
        sums["cropped"] += len(prompt) >= net.config.block_size
        budget = reply_budget(net.config.block_size, len(prompt), max_new_tokens)
        sums["capped"] += max_new_tokens is not None and budget < max_new_tokens
        fitted = fit_prompt(prompt, net.config.block_size)
        jobs.append((i, reply_sequences(tokenizer, fitted, samples, temperature, budget, seed + i, chat)))
    rows = []
    bar = tqdm(total=len(jobs), desc=f"{task.name} {split}", disable=not progress)
    unfinished = [len(seqs) for _, seqs in jobs]

    def score(n: int) -> None:  # a problem's last sequence ended: score it, in the order they finish
        i, seqs = jobs[n]
        greedy, *sampled = [score_reply(s.tokens, tokenizer, task, problems[i], chat) for s in seqs]
        _add(sums, "", [greedy])
        if sampled:
            _add(sums, "sampled_", sampled)
            c = sum(x.correct for x in sampled)
            for k in ks:
                sums[f"pass@{k}"] += pass_at_k(samples, c, k)
        bar.update()
        bar.set_postfix(pass1=f"{sums['correct'] / sums['count']:.3f}")
        if details:
            rows.append({"index": i, "answer": problems[i].answer, "greedy": greedy, "samples": sampled})

    def ended(n: int, token: int | None, reason: str | None) -> None:  # n: the problem's place in jobs
        if reason is not None:
            unfinished[n] -= 1
            if not unfinished[n]:
                score(n)

    for n, (_, seqs) in enumerate(jobs):
        for seq in seqs:
            seq.emit = partial(ended, n)
    was_training = net.training
    try:
        Engine(net, max_batch=batch_size, max_len=net.config.block_size).run([s for _, seqs in jobs for s in seqs])
    finally:
        net.train(was_training)
        bar.close()
    rows.sort(key=lambda row: row["index"])
    t = all_reduce_sum(sums, device, world_size)
    out = _results(task, split, t, samples, temperature, chat, ks)
    out |= {"capped_replies": int(t["capped"])} if max_new_tokens is not None else {}
    return out | ({"details": rows} if details else {})


def _add(sums: dict, prefix: str, scored: list[Scored]) -> None:
    sums[prefix + "count"] += len(scored)
    sums[prefix + "correct"] += sum(s.correct for s in scored)
    sums[prefix + "parsed"] += sum(s.parsed is not None for s in scored)
    sums[prefix + "reply_tokens"] += sum(s.reply_tokens for s in scored)
    sums[prefix + "think_tokens"] += sum(s.think_tokens for s in scored)


def _results(task: Task, split: str, t: dict, samples: int, temperature: float, chat: bool, ks: list[int]) -> dict:
    n = t["count"] or float("nan")
    out = {
        "task": task.name,
        "split": split,
        "prompt_format": "chat" if chat else "plain",
        "count": int(t["count"]),
        "correct": int(t["correct"]),
        "pass@1": t["correct"] / n,
        "format_rate": t["parsed"] / n,
        "reply_tokens": t["reply_tokens"] / n,
        "think_tokens": t["think_tokens"] / n,
        "cropped_prompts": int(t["cropped"]),  # longer than the model's context: their start was cut
    }
    if samples > 1:
        m = t["sampled_count"] or float("nan")
        out |= {"samples": samples, "temperature": temperature}
        out |= {("sampled_pass@1" if k == 1 else f"pass@{k}"): t[f"pass@{k}"] / n for k in ks}
        out |= {"sampled_format_rate": t["sampled_parsed"] / m, "sampled_reply_tokens": t["sampled_reply_tokens"] / m}
        out["sampled_think_tokens"] = t["sampled_think_tokens"] / m
    return out


# ----------------------------------------------------------------------------- the command


def task_options(args: argparse.Namespace) -> dict:
    """The task's options from the command line (arith: digits, ops, seed; gsm8k: data)."""
    if args.eval == "arith":
        return {"digits": args.digits, "ops": args.ops, "seed": args.task_seed}
    return {"data": args.data}


def capped_note(max_new_tokens: int, block_size: int, results: dict) -> str:
    """The one line that says a user's --max-new-tokens was cut to what the context leaves."""
    return (
        f"note: --max-new-tokens {max_new_tokens} capped at what the model's {block_size}-token context leaves "
        f"after the prompt ({results['capped_replies']} of {results['count']} problems)"
    )


def generative_command(args: argparse.Namespace) -> int:
    """`gpt2lab eval gsm8k|arith`: find the problems, load the model, generate, score, print a table or JSON."""
    from gpt2lab.chat.base import is_chat_model
    from gpt2lab.interop.load import load_model
    from gpt2lab.interop.tokenizer_match import model_tokenizer
    from gpt2lab.rl.tasks import get_task

    if args.limit is not None and args.limit < 1:
        raise Gpt2LabError(f"--limit must be >= 1 (got {args.limit})")
    check_sampling_args(args.samples, args.max_new_tokens or 0, args.temperature, None, None)
    task = get_task(args.eval, **task_options(args))
    task.problems(args.split, args.limit)  # a missing dataset fails here, before the model loads
    info = init_distributed(args.device)
    try:
        tokenizer = model_tokenizer(args.model, args.tokenizer)
        chat = is_chat_model(args.model) if args.prompt_format == "auto" else args.prompt_format == "chat"
        model = load_model(args.model, info.device, args.dtype)
        if not chat:
            print0(f"note: {args.model} is not a chat model: asking it in the plain User:/Assistant: transcript")
        results = evaluate(
            model, tokenizer, task, args.split, args.samples, args.limit, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, chat=chat, seed=args.seed, rank=info.rank,
            world_size=info.world_size, progress=info.is_main,
        )  # fmt: skip
        if info.is_main and results.get("capped_replies"):  # an explicit value cut short: say so, once
            print(capped_note(args.max_new_tokens, raw_model(model).config.block_size, results), file=sys.stderr)
        results = {"model": args.model, "device": info.device, "world_size": info.world_size} | results
        results["date"] = datetime.datetime.now().isoformat(timespec="seconds")
        if args.json == "-":
            print0(json.dumps(results, indent=2))
        else:
            shown = [(k, v) for k, v in results.items() if k not in ("model", "task", "split", "date", "device")]
            print0(format_table(f"{task.name} {args.split}: {args.model}", shown))
            if args.json and info.is_main:
                write_json(args.json, results)
                print0(f"wrote {args.json}")
    finally:
        destroy_distributed()
    return 0
