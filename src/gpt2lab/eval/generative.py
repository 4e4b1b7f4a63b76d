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
Under torchrun each rank generates for every world_size-th problem and the sums are all-reduced; the sampling
seed of a problem is seed + its index, so the numbers do not depend on the number of ranks.

Expected results: nanochat's d20 model (561M parameters) scores GSM8K pass@1 4.6% after SFT and 7.6% after RL
(its report); a GPT-2 124M base model answers almost none.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from gpt2lab.chat.template import PLAIN_STOP, render_plain_prompt, render_prompt, split_reply
from gpt2lab.data.shards import write_json
from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval.common import all_reduce_sum, format_table, raw_model
from gpt2lab.inference.generate import check_sampling_args, generate, generate_ids
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


def generate_replies(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[int],
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    seed: int | None = None,
    chat: bool = True,
) -> list[list[int]]:
    """n replies to one prompt, as token ids cut before their end (<|assistant_end|>; a base model: <|endoftext|>
    or the "\\nUser:" it writes, which stays in the ids and is cut from the text by ``score_reply``)."""
    kwargs = dict(num_samples=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if chat:
        end = tokenizer.special_id("<|assistant_end|>")
        replies = generate_ids(model, prompt_ids, eos_id=end, **kwargs)
        return [r[: r.index(end)] if end in r else r for r in replies]
    replies, done = [[] for _ in range(n)], [False] * n
    for step in generate(model, prompt_ids, eos_id=tokenizer.eot, **kwargs):
        for i, token in enumerate(step):
            if token is None or done[i]:
                continue
            if token == tokenizer.eot:
                done[i] = True
                continue
            replies[i].append(token)
            done[i] = PLAIN_STOP in tokenizer.decode(replies[i][-8:])  # "\nUser:" is a few tokens
        if all(done):
            break
    return replies


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
    Past the context every new token runs through generate's sliding window, a full forward pass each, and
    forgets the prompt's start: a small model's default of 256 made 20 arith problems take minutes."""
    room = block_size - prompt_len if prompt_len < block_size else block_size
    return room if max_new_tokens is None else min(max_new_tokens, room)


def score_problem(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    problem: Problem,
    prompt: list[int],
    samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    seed: int | None = None,
    chat: bool = True,
) -> tuple[Scored, list[Scored]]:
    """The greedy reply to one problem, and its ``samples`` replies sampled as one batch (none for 1), scored."""
    ids = generate_replies(model, tokenizer, prompt, 1, 0.0, max_new_tokens, None, chat)[0]
    greedy = score_reply(ids, tokenizer, task, problem, chat)
    if samples < 2:
        return greedy, []
    replies = generate_replies(model, tokenizer, prompt, samples, temperature, max_new_tokens, seed, chat)
    return greedy, [score_reply(r, tokenizer, task, problem, chat) for r in replies]


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
) -> dict:
    """pass@1 (greedy), pass@k from ``samples`` replies (>= 2), format rate and lengths over the first ``limit``
    problems of a split, summed over all ranks. Each reply stops where the context is full (``reply_budget``);
    with max_new_tokens given, the results count the replies it was cut for (capped_replies). ``details``: also
    this rank's replies, per problem."""
    check_sampling_args(samples, max_new_tokens or 0, temperature, None, None)
    problems = task.problems(split, limit)
    net = raw_model(model)
    device = next(net.parameters()).device
    render = render_prompt if chat else render_plain_prompt
    ks = pass_ks(samples) if samples > 1 else []
    keys = ["count", "correct", "parsed", "reply_tokens", "think_tokens"]
    sums = dict.fromkeys(keys + [f"sampled_{k}" for k in keys] + [f"pass@{k}" for k in ks] + ["cropped", "capped"], 0.0)
    rows = []
    was_training = net.training
    net.eval()
    try:
        with warnings.catch_warnings():  # generate warns per over-long prompt: counted in "cropped" instead
            warnings.simplefilter("ignore")
            bar = tqdm(range(rank, len(problems), world_size), desc=f"{task.name} {split}", disable=not progress)
            for i in bar:
                p = problems[i]
                prompt = render(p.messages, tokenizer)
                sums["cropped"] += len(prompt) > net.config.block_size
                budget = reply_budget(net.config.block_size, len(prompt), max_new_tokens)
                sums["capped"] += max_new_tokens is not None and budget < max_new_tokens
                greedy, sampled = score_problem(
                    net, tokenizer, task, p, prompt, samples, temperature, budget, seed + i, chat
                )
                _add(sums, "", [greedy])
                if sampled:
                    _add(sums, "sampled_", sampled)
                    c = sum(s.correct for s in sampled)
                    for k in ks:
                        sums[f"pass@{k}"] += pass_at_k(samples, c, k)
                bar.set_postfix(pass1=f"{sums['correct'] / sums['count']:.3f}")
                if details:
                    rows.append({"index": i, "answer": p.answer, "greedy": greedy, "samples": sampled})
    finally:
        net.train(was_training)
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
