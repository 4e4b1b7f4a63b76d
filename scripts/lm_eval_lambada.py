"""EleutherAI's lm-evaluation-harness scores LAMBADA through `gpt2lab serve` as `gpt2lab eval lambada` does.

One command, in a temporary folder (or OUT, kept), on 127.0.0.1:

    1. a small GPT with GPT-2's tokenizer (random, or ``--train-steps`` of overfitting the passages scored, so
       some last words are right), saved as a gpt2lab model, and ``gpt2lab export``-ed as a Hugging Face folder
    2. a local lm-eval task over the mirror's LAMBADA: the first LIMIT passages split into context and target
       by gpt2lab's own rule (``gpt2lab.eval.lambada.split_last_word``) in a JSONL the task reads; otherwise
       lm-eval's ``lambada_openai`` (loglikelihood; perplexity and acc)
    3. three scorings of the same passages:
       - ``gpt2lab eval lambada --model RUN --limit N``
       - ``lm_eval --model local-completions`` against ``gpt2lab serve --model RUN`` (token-id prompts,
         ``echo``, ``logprobs: 1``, ``max_tokens: 1``: lm-eval's loglikelihood requests)
       - ``lm_eval --model hf`` on the export (transformers' GPT2LMHeadModel)
    4. ``lm_eval --model local-chat-completions --apply_chat_template`` on a few arithmetic questions through
       the server's /v1/chat/completions: chat generation runs end to end (the score is not the point)

and prints the results with each one's relative difference from `gpt2lab eval lambada`; it exits non-zero when
a perplexity differs by more than ``--rtol`` (1e-5) or an accuracy at all. lm-eval goes in its own virtualenv
(the project's stays as locked); nothing is downloaded (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE):

    python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install "lm-eval[api]" torch transformers accelerate
    python scripts/lm_eval_lambada.py --lm-eval /tmp/lmeval-venv/bin/lm_eval --limit 40

lm-eval splits a passage into tokens as context + target encoded together, gpt2lab encodes the target on its
own; with GPT-2's BPE both give the same tokens when the word starts a new pre-token (always, after a space and
a letter): the script counts the passages where they differ (``token_split_differs``).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt2lab.checkpoint.folder import save_model
from gpt2lab.eval.lambada import load_passages, locate
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import EOT_ID, get_tokenizer

TASK = "gpt2lab_lambada"
CHAT_TASK = "gpt2lab_chat_arith"
SERVED = "gpt2lab-lambada"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

CHAT_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "What is {{{{question}}}}? Answer with the number."
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def make_model(out: Path, passages: list[tuple[str, str]], train_steps: int, seed: int = 0) -> Path:
    """A 2-layer GPT with GPT-2's vocabulary and 1024-token context (no passage is cut), trained
    ``train_steps`` full-batch steps on the passages themselves: memorised last words give a non-zero acc."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=1024, vocab_size=50257, padded_vocab_size=50304, n_layer=2, n_head=2, n_embd=64)
    model = GPT(config)
    if train_steps:
        tokenizer = get_tokenizer()
        rows = [tokenizer.encode_ordinary(ctx + word) + [EOT_ID] for ctx, word in passages]
        T = max(len(r) for r in rows) - 1
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        targets = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: padding, not learned
        for i, r in enumerate(rows):
            idx[i, : len(r) - 1], targets[i, : len(r) - 1] = torch.tensor(r[:-1]), torch.tensor(r[1:])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for step in range(train_steps):
            _, loss = model(idx, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            print(f"train step {step + 1}/{train_steps}: loss {loss.item():.3f}", flush=True)
    return save_model(model.eval(), out)


def write_tasks(folder: Path, passages: list[tuple[str, str]]) -> Path:
    """The LAMBADA task (gpt2lab's context/target split, pre-computed) and a small chat arithmetic task."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"context": ctx, "target": word}) for ctx, word in passages]
    (folder / "lambada.jsonl").write_text("\n".join(lines) + "\n")
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=folder / "lambada.jsonl"))
    problems = [{"question": f"{a} + {b}", "answer": str(a + b)} for a, b in ((2, 3), (10, 7), (41, 1), (6, 6))]
    (folder / "arith.jsonl").write_text("\n".join(json.dumps(p) for p in problems) + "\n")
    (folder / f"{CHAT_TASK}.yaml").write_text(CHAT_YAML.format(task=CHAT_TASK, data=folder / "arith.jsonl"))
    return folder


def token_split_differs(passages: list[tuple[str, str]]) -> int:
    """Passages whose target tokens differ between lm-eval's split (context + target encoded together, the
    context's tokens removed) and gpt2lab's (the target encoded on its own)."""
    tok = get_tokenizer()
    n = 0
    for ctx, word in passages:
        whole, context = tok.encode_ordinary(ctx + word), tok.encode_ordinary(ctx)
        n += whole[len(context) :] != tok.encode_ordinary(word) or whole[: len(context)] != context
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path, log: Path, timeout: float = 120.0) -> Iterator[str]:
    """`gpt2lab serve --model RUN` on 127.0.0.1 until the block ends; yields its base URL (…/v1)."""
    port = free_port()
    cmd = ["gpt2lab", "serve", "--model", str(run), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", SERVED, "--log-level", "warning"]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                sys.exit(f"gpt2lab serve exited ({proc.returncode}):\n{log.read_text()}")
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"gpt2lab serve did not answer in {timeout:.0f} s:\n{log.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def lm_eval(exe: str, model: str, model_args: dict, tasks: Path, task: str, limit: int, out: Path,
            extra: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Run lm-eval once; the task's metrics ({"acc,none": ..., ...}) from its results file."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = [exe, "run", "--model", model, "--model_args", args, "--include_path", str(tasks), "--tasks", task,
           "--limit", str(limit), "--batch_size", "8", "--output_path", str(out), *extra]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    env = os.environ | OFFLINE
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lm_eval --model {model} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    files = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))
    if not files:
        sys.exit(f"lm_eval --model {model} wrote no results under {out}")
    return json.loads(Path(files[-1]).read_text())["results"][task]


def gpt2lab_eval(run: Path, limit: int, out: Path) -> dict:
    cmd = ["gpt2lab", "eval", "lambada", "--model", str(run), "--limit", str(limit), "--json", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.read_text())["lambada"]


def compare(results: dict[str, dict], rtol: float) -> tuple[list[str], bool]:
    """Table lines (acc, ppl, ppl's relative difference from the first row) and whether all agree."""
    ref = next(iter(results.values()))
    lines, ok = [f"{'scorer':<44} {'acc':>8} {'ppl':>16} {'rel. diff ppl':>14}"], True
    for name, r in results.items():
        rel = abs(r["ppl"] - ref["ppl"]) / abs(ref["ppl"])
        ok &= rel <= rtol and r["acc"] == ref["acc"]
        lines.append(f"{name:<44} {r['acc']:>8.4f} {r['ppl']:>16.6f} {rel:>14.3e}")
    return lines, ok


def chat_samples(out: Path) -> list[dict]:
    """The chat run's requests and replies (its --log_samples file)."""
    files = sorted(glob.glob(str(out / "**" / f"samples_{CHAT_TASK}_*.jsonl"), recursive=True))
    return [json.loads(line) for line in Path(files[-1]).read_text().splitlines()] if files else []


def harness_metrics(metrics: dict) -> dict:
    return {"acc": metrics["acc,none"], "ppl": metrics["perplexity,none"]}


def pipeline(args: argparse.Namespace, out: Path) -> bool:
    passages = load_passages(locate(args.data), args.limit)
    run = make_model(out / "run", passages, args.train_steps)
    subprocess.run(["gpt2lab", "export", str(run), str(out / "hf")], check=True, capture_output=True)
    tasks = write_tasks(out / "tasks", passages)
    results = {"gpt2lab eval lambada": gpt2lab_eval(run, args.limit, out / "gpt2lab_eval.json")}
    hf_tok = {"tokenizer_backend": "huggingface", "tokenizer": out / "hf"}
    with serving(run, out / "serve.log") as url:
        completions = {"model": SERVED, "base_url": url + "/completions", "tokenized_requests": True,
                       "max_length": 1024, "num_concurrent": 1, "max_retries": 1, **hf_tok}  # fmt: skip
        m = lm_eval(args.lm_eval, "local-completions", completions, tasks, TASK, args.limit, out / "lm_api")
        results["lm-eval local-completions (gpt2lab serve)"] = harness_metrics(m)
        chat = {"model": SERVED, "base_url": url + "/chat/completions", "num_concurrent": 1, "max_retries": 1}
        c = lm_eval(args.lm_eval, "local-chat-completions", chat, tasks, CHAT_TASK, 4, out / "lm_chat",
                    ("--apply_chat_template", "--log_samples"))  # fmt: skip
    hf = {"pretrained": out / "hf", "dtype": "float32"}
    results["lm-eval hf (gpt2lab export)"] = harness_metrics(
        lm_eval(args.lm_eval, "hf", hf, tasks, TASK, args.limit, out / "lm_hf", ("--device", "cpu"))
    )
    lines, ok = compare(results, args.rtol)
    print(f"\nLAMBADA, first {args.limit} passages ({token_split_differs(passages)} token_split_differs):")
    print("\n".join(lines))
    print(f"\nlm-eval local-chat-completions, {CHAT_TASK} (4 questions): exact_match {c['exact_match,none']}")
    for sample in chat_samples(out / "lm_chat"):
        print(f"  {sample['arguments']['gen_args_0']['arg_0']!r:.90} -> {sample['resps'][0][0]!r}")
    print(f"\n{'AGREE' if ok else 'DISAGREE'}: ppl within relative {args.rtol:g}, acc exactly")
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lm-eval", default="lm_eval", help="the lm_eval command (in its own virtualenv)")
    p.add_argument("--limit", type=int, default=40, help="LAMBADA passages scored (the file's first ones)")
    p.add_argument("--data", default=None, metavar="FILE", help="lambada_test.jsonl (default: the mirror's)")
    p.add_argument("--train-steps", type=int, default=0, help="full-batch steps on the passages (0: random)")
    p.add_argument("--rtol", type=float, default=1e-5, help="largest relative difference of the perplexities")
    p.add_argument("--out", default=None, help="keep every file in this folder (default: a temporary one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out.mkdir(parents=True, exist_ok=True)
        return 0 if pipeline(args, out) else 1


if __name__ == "__main__":
    sys.exit(main())
