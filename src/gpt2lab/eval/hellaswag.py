"""HellaSwag (Zellers et al., 2019) validation accuracy, completion style, as build-nanogpt / llm.c score it.

Expected results on the official ``hellaswag_val.jsonl`` (10,042 examples), from build-nanogpt's
``hellaswag.py`` (the reference reproduction):

    gpt2     (124M)   acc 0.2859   acc_norm 0.2955
    gpt2-xl (1558M)   acc 0.3842   acc_norm 0.4893

lm-evaluation-harness reports 0.2892 / 0.3114 (gpt2) and 0.4004 / 0.5089 (gpt2-xl) for its
multiple-choice style, whose acc_norm divides by the ending's length in bytes and whose
context is preprocessed differently; the two are not comparable digit for digit.

Scoring: the context, then each of the 4 endings with a leading space; the cross-entropy over
the ending tokens only (context and ending tokenized separately, as build-nanogpt does).
- acc: the ending with the lowest summed loss (highest log-likelihood);
- acc_norm: the ending with the lowest MEAN loss per ending token (build-nanogpt's
  definition, not the harness's per-byte normalisation).
Ties go to the lowest index. The 4 endings of several examples share one forward pass.

Data: ``--data FILE``; else the official file (cached, or downloaded and sha256-checked when
online); else the offline mirror's text-derived copy (``$GPT2LAB_MIRROR/hellaswag/
hellaswag_val_from_text.jsonl``: the same examples with the WikiHow markers stripped, so its
accuracies are close to, but not exactly, the official ones). The output names the file scored.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.eval.common import Pair, Scores, all_reduce_sum, format_table, mirror_file, read_jsonl, score_pairs, shard
from gpt2lab.runtime.dist import print0
from gpt2lab.tokenizer.bpe import Tokenizer

OFFICIAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
OFFICIAL_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
OFFICIAL_NAME = "hellaswag_val.jsonl"
MIRROR_PATH = "hellaswag/hellaswag_val_from_text.jsonl"
NUM_ENDINGS = 4


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int


# ----------------------------------------------------------------------------- the data file


def cache_dir() -> Path:
    """Where downloads are kept: $GPT2LAB_CACHE, else $XDG_CACHE_HOME/gpt2lab, else ~/.cache/gpt2lab."""
    if os.environ.get("GPT2LAB_CACHE"):
        return Path(os.environ["GPT2LAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2lab"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline() -> bool:
    return any(os.environ.get(v) == "1" for v in ("GPT2LAB_OFFLINE", "HF_HUB_OFFLINE"))


def download_official(timeout: float = 10.0) -> Path | None:
    """The official val file in the cache, downloading it if needed; None when offline or not verifiable."""
    dest = cache_dir() / "hellaswag" / OFFICIAL_NAME
    if dest.is_file() and sha256(dest) == OFFICIAL_SHA256:
        return dest
    if _offline():
        return None
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # one per process: ranks may race
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(OFFICIAL_URL, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        if sha256(tmp) != OFFICIAL_SHA256:
            print0(f"warning: {OFFICIAL_URL} did not match the expected sha256; not used")
            return None
        tmp.replace(dest)
        return dest
    except OSError:  # no network, DNS failure, HTTP error, read-only cache
        return None
    finally:
        tmp.unlink(missing_ok=True)


def locate(data: str | Path | None = None) -> Path:
    """The file to score: ``data``, else the official file, else the mirror's text-derived copy."""
    if data is not None:
        return Path(data)
    path = download_official() or mirror_file(MIRROR_PATH)
    if path is None:
        raise Gpt2LabError(
            f"no HellaSwag file: {OFFICIAL_URL} could not be downloaded and no mirror is set; "
            f"pass --data FILE, or set GPT2LAB_MIRROR to a folder holding {MIRROR_PATH}"
        )
    return path


def describe(path: Path) -> str:
    """One line saying which file this is: the official file, the mirror's text-derived copy, or other."""
    if sha256(path) == OFFICIAL_SHA256:
        return f"{path} (official {OFFICIAL_NAME}, sha256 verified)"
    if path.name == Path(MIRROR_PATH).name:
        return f"{path} (text-derived copy, WikiHow markers stripped: close to, not exactly, official accuracies)"
    return f"{path} (not the official file: sha256 differs)"


def _parse(obj: dict, where: str) -> Example:
    ctx, endings, label = obj.get("ctx"), obj.get("endings"), obj.get("label")
    if not isinstance(ctx, str):
        raise Gpt2LabError(f"{where}: missing or non-string 'ctx'")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise Gpt2LabError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not (isinstance(label, int) and 0 <= label < NUM_ENDINGS):
        raise Gpt2LabError(f"{where}: 'label' must be an integer 0-{NUM_ENDINGS - 1}, got {label!r}")
    return Example(ctx, tuple(endings), label)


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Examples of a HellaSwag jsonl file (official or text-derived: both have ctx, endings, label)."""
    rows = read_jsonl(path)
    if limit is not None:
        rows = rows[:limit]
    return [_parse(obj, f"{path}, line {lineno}") for lineno, obj in rows]


# ----------------------------------------------------------------------------- scoring


def encode(tokenizer: Tokenizer, examples: list[Example]) -> list[Pair]:
    """4 (context, ending) pairs per example; each ending gets its leading space."""
    pairs = []
    for ex in examples:
        ctx = tokenizer.encode_ordinary(ex.ctx)
        pairs += [(ctx, tokenizer.encode_ordinary(" " + end)) for end in ex.endings]
    return pairs


def score_examples(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    examples: list[Example],
    device: str | torch.device,
    batch_size: int = 8,
    progress: bool = False,
) -> Scores:
    """Per-candidate scores, 4 rows per example, in order; ``batch_size`` examples per forward pass."""
    pairs = encode(tokenizer, examples)
    return score_pairs(model, pairs, device, batch_size, group=NUM_ENDINGS, progress=progress, desc="hellaswag")


def evaluate_hellaswag(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    examples: list[Example],
    device: str | torch.device,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict:
    """acc, acc_norm and count over all ranks; each rank scores every world_size-th example.

    Callable from a training loop (pass the raw model; it is restored to train mode after).
    """
    mine = shard(examples, rank, world_size)
    correct = correct_norm = 0
    if mine:
        scores = score_examples(model, tokenizer, mine, device, batch_size, progress)
        labels = torch.tensor([ex.label for ex in mine])
        sum_loss = scores.sum_loss.view(-1, NUM_ENDINGS)  # (n_examples, 4)
        mean_loss = scores.mean_loss.view(-1, NUM_ENDINGS)  # (n_examples, 4)
        correct = int((sum_loss.argmin(1) == labels).sum())
        correct_norm = int((mean_loss.argmin(1) == labels).sum())
    totals = all_reduce_sum({"correct": correct, "correct_norm": correct_norm, "count": len(mine)}, device, world_size)
    count = int(totals["count"])
    return {
        "acc": totals["correct"] / count if count else float("nan"),
        "acc_norm": totals["correct_norm"] / count if count else float("nan"),
        "correct": int(totals["correct"]),
        "correct_norm": int(totals["correct_norm"]),
        "count": count,
    }


def run_hellaswag(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    device: str | torch.device,
    data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """The ``eval hellaswag`` command's work: locate, load, score, print a table; returns the results."""
    path = locate(data)  # on every rank: a download goes through a per-process temp file, so ranks may race
    about = describe(path)
    examples = load_examples(path, limit)
    print0(f"HellaSwag file: {about}")
    result = evaluate_hellaswag(model, tokenizer, examples, device, batch_size, rank, world_size, progress=rank == 0)
    result["file"] = about
    print0(
        format_table(
            "HellaSwag (acc: summed log-likelihood; acc_norm: mean loss per ending token)",
            [("acc", result["acc"]), ("acc_norm", result["acc_norm"]), ("count", result["count"])],
        )
    )
    return result
