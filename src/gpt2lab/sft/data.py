"""SFT data: conversation files read as messages, mixed with weights, split, packed into (x, y) rows.

Readers (the layout is recognised per record, the file may be a JSON array or JSON lines):
- ``{"messages": [{"role", "content"}, ...]}``: OpenAI's fine-tuning format, taken as is;
- ``{"conversations": [{"from", "value"}, ...]}``: ShareGPT (from human/user, gpt/assistant, system);
- ``{"instruction", "input"|"context", "output"|"response"}``: Alpaca, and Dolly (its ``context``);
  the input or context follows the instruction after a blank line;
- ``{"question", "answer"}``: GSM8K (the worked answer, ``#### N`` line included).
Every content has ``{{name}}`` and ``{{author}}`` filled from [sft] (the identity set's placeholders).

Packing (``sft.packing``): rendered conversations (``gpt2lab.chat.template``) become rows of ``block_size + 1``
tokens, the rest of a row padded with target -1. Targets are -1 outside the mask (prompts, padding), so only
assistant tokens are trained. Three ways:
- ``mask`` (default): laid one after another, a new row when the next one does not fit, and each batch carries
  the conversations' ids (B, T), from which the model builds a block-diagonal causal mask and restarts the
  positions at each conversation (``gpt2lab.model.gpt.document_mask``): every conversation is computed exactly as
  alone, as the chat sees it (position 0 onwards, nothing before it), at packing's density;
- ``pad``: one conversation per row (nanochat's SFT): never any crossing, the cost is the padding;
- ``cross``: packed as ``mask`` but no mask: attention looks back into the earlier conversations of the row,
  as across documents in pretraining (absolute positions in the row). Kept for comparison (BENCHMARKS.md).

A conversation longer than a row is cut to it (``overlong = "truncate"``, kept only if a trained token survives)
or left out (``"drop"``); both are counted, so a set of over-long conversations is a clear error, never a run of
all-padding rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt2lab.chat.template import render
from gpt2lab.errors import Gpt2LabError
from gpt2lab.rl.gsm8k import CALCULATOR

OVERLONG = ("truncate", "drop")
PACKINGS = ("mask", "pad", "cross")


@dataclass
class SFTConfig:
    """The [sft] section: the model fine-tuned, its conversations, and the learning-rate schedule of SFT."""

    model: str = ""  # the model fine-tuned: run folder, checkpoint, Hugging Face folder or GPT-2 name ("" = no SFT)
    data: str = ""  # conversation files, comma-separated, each PATH or PATH:WEIGHT (weight 2 = each twice per epoch)
    val_fraction: float = 0.05  # share of each file held out for the val loss (at least one conversation)
    overlong: str = "truncate"  # a conversation longer than the context: truncate (cut to it) or drop
    packing: str = "mask"  # mask (packed, attention within each conversation), pad (one per row), cross (packed)
    thinking: bool = False  # GSM8K: the worked solution as the reply's thinking span, the number as its answer
    calculator: str = "strip"  # GSM8K's <<48/2=24>> annotations: strip, keep (as text) or tool (calculator calls)
    name: str = "gpt2lab"  # fills {{name}} in the data (the identity set)
    author: str = "the gpt2lab authors"  # fills {{author}}
    # The schedule replaces [optim]'s in an SFT run: 2e-5, cosine to 0 after 3% warmup, no weight decay, as in
    # Alpaca (Taori et al. 2023, lr 2e-5, warmup 3%) and the Zephyr SFT recipe (Tunstall et al. 2023, 2e-5).
    # Those are for 7B models; a small model takes a larger lr (a tiny one from scratch: 1e-3).
    lr: float = 2e-5
    warmup_fraction: float = 0.03  # share of train.max_steps spent warming up
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0

    def validate(self) -> list[str]:
        problems = []
        if self.data and not self.model:
            problems.append("sft.model is empty: name the model to fine-tune (gpt2lab sft --model ...)")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"sft.val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.calculator not in CALCULATOR:
            problems.append(f"sft.calculator must be one of {', '.join(CALCULATOR)} (got {self.calculator!r})")
        if self.overlong not in OVERLONG:
            problems.append(f"sft.overlong must be truncate or drop (got {self.overlong!r})")
        if self.packing not in PACKINGS:
            problems.append(f"sft.packing must be one of {', '.join(PACKINGS)} (got {self.packing!r})")
        if self.lr <= 0 or not 0 <= self.warmup_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            problems.append("sft.lr must be > 0, sft.warmup_fraction and sft.min_lr_ratio in [0, 1]")
        if self.weight_decay < 0:
            problems.append(f"sft.weight_decay must be >= 0 (got {self.weight_decay})")
        try:
            parse_data(self.data)
        except Gpt2LabError as e:
            problems.append(str(e))
        return problems


def packing_problems(sft: SFTConfig, perf) -> list[str]:
    """sft.packing = mask with a forced attention kernel that takes no mask (flash; cuDNN's is not relied on)."""
    if sft.data and sft.packing == "mask" and perf.attn_backend in ("flash", "cudnn"):
        return [
            f"sft.packing = mask needs an attention kernel that takes a mask, and perf.attn_backend = "
            f"{perf.attn_backend} does not: use auto, efficient or math, or sft.packing = pad"
        ]
    return []


def parse_data(spec: str) -> list[tuple[str, float]]:
    """'a.jsonl,b.json:2' -> [('a.jsonl', 1.0), ('b.json', 2.0)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, colon, weight = item.rpartition(":")
        try:
            w = float(weight) if colon else 1.0
        except ValueError:
            colon = ""  # a colon inside the path itself
        if not colon:
            path, w = item, 1.0
        if not w > 0:
            raise Gpt2LabError(f"sft.data: the weight of {path} must be > 0 (got {weight})")
        out.append((path, w))
    return out


# ----------------------------------------------------------------------------- readers


def _fill(text: object, fill: dict[str, str]) -> object:
    if isinstance(text, str):
        for key, value in fill.items():
            text = text.replace("{{" + key + "}}", value)
    return text


def _messages(record: object, where: str, thinking: bool = False, calculator: str = "strip") -> list[dict]:
    """One record of any known layout as OpenAI messages (an assistant's reasoning_content kept)."""
    if not isinstance(record, dict):
        raise Gpt2LabError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        return [
            {"role": m.get("role"), "content": m.get("content")}
            | ({"reasoning_content": m["reasoning_content"]} if "reasoning_content" in m else {})
            for m in record["messages"]
        ]
    if "conversations" in record:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        turns = record["conversations"]
        bad = next((t.get("from") for t in turns if t.get("from") not in roles), None)
        if bad is not None:
            raise Gpt2LabError(f"{where}: unknown ShareGPT speaker {bad!r} (expected human, gpt or system)")
        return [{"role": roles[t["from"]], "content": t.get("value")} for t in turns]
    if "instruction" in record:
        extra = record.get("input") or record.get("context") or ""
        prompt = f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]
        answer = record["output"] if "output" in record else record.get("response")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if "question" in record and "answer" in record:  # GSM8K: with thinking, the solution is the reasoning
        from gpt2lab.rl.gsm8k import gsm8k_messages

        return gsm8k_messages(record, thinking=thinking, calculator=calculator)
    keys = ", ".join(sorted(record)[:6])
    raise Gpt2LabError(
        f"{where}: unknown record layout (keys {keys}); expected messages, conversations (ShareGPT), "
        "instruction/input/output (Alpaca, Dolly) or question/answer (GSM8K)"
    )


def read_conversations(
    path: str | Path, fill: dict[str, str] | None = None, thinking: bool = False, calculator: str = "strip"
) -> list[list[dict]]:
    """Every conversation of a JSON array or JSON-lines file (a folder: its train.jsonl), as messages,
    placeholders filled; thinking and calculator: how GSM8K records map (gsm8k_messages)."""
    path = Path(path)
    if path.is_dir() and (path / "train.jsonl").is_file():  # e.g. the mirror's gsm8k/ with train and test
        path = path / "train.jsonl"
    if not path.is_file():
        raise Gpt2LabError(f"{path}: SFT data file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = [(f"{path} record {i}", r) for i, r in enumerate(json.loads(text))]
        else:
            lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
            records = [(f"{path}:{i}", json.loads(line)) for i, line in lines]
    except json.JSONDecodeError as e:
        raise Gpt2LabError(f"{path}: not JSON or JSON lines ({e})") from None
    fill = fill or {}
    out = []
    for where, record in records:
        messages = _messages(record, where, thinking, calculator)
        out.append([{k: _fill(v, fill) if k != "role" else v for k, v in m.items()} for m in messages])
    if not out:
        raise Gpt2LabError(f"{path}: no conversations")
    return out


def mixture(cfg: SFTConfig, seed: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, val) conversations: each file split (val_fraction held out), train repeated/sampled by weight."""
    fill = {"name": cfg.name, "author": cfg.author}
    train, val = [], []
    for k, (path, weight) in enumerate(parse_data(cfg.data)):
        convs = read_conversations(path, fill, cfg.thinking, cfg.calculator)
        rng = np.random.default_rng([seed, k])
        order = rng.permutation(len(convs))
        n_val = max(1, round(cfg.val_fraction * len(convs))) if cfg.val_fraction > 0 and len(convs) > 1 else 0
        val += [convs[i] for i in order[:n_val]]
        rest = [convs[i] for i in order[n_val:]]
        whole, part = int(weight), weight - int(weight)
        train += rest * whole + [rest[i] for i in rng.permutation(len(rest))[: round(part * len(rest))]]
    return train, val


# ----------------------------------------------------------------------------- packing


@dataclass
class Packed:
    """Rows of ``T + 1`` tokens and their targets' mask, and what packing counted."""

    tokens: np.ndarray  # (N, T+1) int32
    trained: np.ndarray  # (N, T+1) bool: token i is a target (of position i-1)
    docs: np.ndarray | None = None  # (N, T+1) int32: each token's conversation in its row (packing "mask")
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0

    def summary(self) -> str:
        fill = self.trained.sum() / max(1, self.trained.size)
        return (
            f"{self.conversations} conversations in {len(self.tokens)} rows ({fill:.0%} of tokens trained); "
            f"over-long: {self.truncated} truncated, {self.dropped} dropped"
        )


def pack(
    conversations: list[list[dict]], tokenizer, block_size: int, overlong: str = "truncate", packing: str = "mask",
    tools: bool = False,
) -> Packed:  # fmt: skip
    """Lay rendered conversations into rows of block_size + 1 tokens, in order (a new row when one does not fit;
    packing "pad": a row each). "mask" also numbers each token's conversation (padding: one more number).
    tools: calculator annotations rendered as calls (``render``'s ``tools``; sft.calculator = "tool")."""
    cap = block_size + 1
    rows_t, rows_m, rows_d, row_t, row_m, row_d = [], [], [], [], [], []
    kept = truncated = dropped = 0
    for conv in conversations:
        ids, mask = render(conv, tokenizer, tools=tools)
        if len(ids) > cap:
            if overlong == "drop" or not any(mask[1:cap]):  # nothing trained would survive the cut
                dropped += 1
                continue
            ids, mask, truncated = ids[:cap], mask[:cap], truncated + 1
        if row_t and (packing == "pad" or len(row_t) + len(ids) > cap):
            rows_t.append(row_t), rows_m.append(row_m), rows_d.append(row_d)
            row_t, row_m, row_d = [], [], []
        doc = row_d[-1] + 1 if row_d else 0
        row_t, row_m, row_d, kept = row_t + ids, row_m + mask, row_d + [doc] * len(ids), kept + 1
    if row_t:
        rows_t.append(row_t), rows_m.append(row_m), rows_d.append(row_d)
    tokens = np.full((len(rows_t), cap), tokenizer.eot, dtype=np.int32)
    trained = np.zeros((len(rows_t), cap), dtype=bool)
    docs = np.zeros((len(rows_t), cap), dtype=np.int32)
    for i, (t, m, d) in enumerate(zip(rows_t, rows_m, rows_d)):
        tokens[i, : len(t)], trained[i, : len(m)] = t, m
        docs[i, : len(d)], docs[i, len(d) :] = d, d[-1] + 1  # the padding: a document of its own
    return Packed(tokens, trained, docs if packing == "mask" else None, kept, truncated, dropped)


class SFTLoader:
    """(x, y) batches of packed rows, y = -1 where nothing is trained; shuffled per epoch, DDP-sliced, resumable.

    Rows packed with a document mask (``packed.docs``) come as (x, y, doc_ids), doc_ids (B, T) each x token's
    conversation: the training loop passes them to the model (``GPT.forward(..., doc_ids=)``).

    The same interface as ``ShardLoader``; SFT's objective (``gpt2lab.sft.objective``) tells the training loop to
    average the loss over the trained tokens of the whole global batch. A global batch takes B * world_size rows (rank r
    the r-th B of them), wrapping around the epoch's row order when the rows run out.
    """

    def __init__(
        self, packed: Packed, batch_size: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
        seed: int = 1337, device: str | torch.device = "cpu",
    ):  # fmt: skip
        if len(packed.tokens) == 0:
            raise Gpt2LabError("no conversation fits the model's context: nothing to train on")
        self.packed, self.B, self.rank, self.world_size = packed, batch_size, rank, world_size
        self.shuffle, self.seed, self.device = shuffle, seed, torch.device(device)
        self.epoch, self.batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.packed.tokens) // (self.B * self.world_size))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        n = len(self.packed.tokens)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        first = self.batch * self.B * self.world_size + self.rank * self.B
        rows = order[np.arange(first, first + self.B) % n]
        self.batch += 1
        tokens = torch.from_numpy(self.packed.tokens[rows].astype(np.int64))  # (B, T+1)
        trained = torch.from_numpy(self.packed.trained[rows])
        x = tokens[:, :-1]
        y = torch.where(trained[:, 1:], tokens[:, 1:], -1)  # (B, T): -1 is ignored by the loss
        if self.packed.docs is None:
            return x.to(self.device), y.to(self.device)
        docs = torch.from_numpy(self.packed.docs[rows, :-1].astype(np.int64))  # (B, T): x's conversations
        return x.to(self.device), y.to(self.device), docs.to(self.device)

    def reset(self) -> None:
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict:
        masked = self.packed.docs is not None
        return {"epoch": self.epoch, "batch": self.batch, "rows": len(self.packed.tokens), "seed": self.seed,
                "doc_mask": masked}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        saved = "mask" if state.get("doc_mask") else "cross or pad"  # saved before sft.packing existed: cross
        if (saved == "mask") != (self.packed.docs is not None):
            raise Gpt2LabError(
                f"cannot resume the SFT loader: the run was packed with sft.packing = {saved}; resume with "
                f"--set sft.packing={saved.split()[0]} (an exact resume needs the same data and config)"
            )
        if state.get("rows") != len(self.packed.tokens) or state.get("seed") != self.seed:
            raise Gpt2LabError(
                f"cannot resume the SFT loader: the data packs into {len(self.packed.tokens)} rows now, "
                f"{state.get('rows')} when saved (an exact resume needs the same data and config)"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def sft_loaders(
    cfg, batch_size: int, rank: int, world_size: int, device, resume_from: Path | None = None
) -> tuple[SFTLoader, SFTLoader | None]:
    """The train and val loaders of an SFT run (cfg: the run's Config, with [sft]); packing counts printed once.

    resume_from: the checkpoint a resumed run continues from, which holds its tokenizer (the base may be gone).
    """
    from gpt2lab.interop.tokenizer_match import run_tokenizer

    tokenizer = run_tokenizer(cfg, resume_from)  # the fine-tuned model's: GPT-2's or a trained one
    train, val = mixture(cfg.sft, cfg.train.seed)
    kw = dict(rank=rank, world_size=world_size, seed=cfg.train.seed, device=device)
    tools = cfg.sft.calculator == "tool"  # every file's <<expr=result>> as calls, GSM8K's and arith --tool's
    packed = pack(train, tokenizer, cfg.model.block_size, cfg.sft.overlong, cfg.sft.packing, tools)
    if rank == 0:
        print(f"sft train: {packed.summary()}", flush=True)
    loader = SFTLoader(packed, batch_size, **kw)
    val_loader = None
    if val and cfg.eval.val_every > 0:
        packed_val = pack(val, tokenizer, cfg.model.block_size, cfg.sft.overlong, cfg.sft.packing, tools)
        if rank == 0:
            print(f"sft val: {packed_val.summary()}", flush=True)
        if len(packed_val.tokens):
            val_loader = SFTLoader(packed_val, batch_size, shuffle=False, **kw)
    return loader, val_loader
