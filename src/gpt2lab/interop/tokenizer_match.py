"""Which tokenizer goes with a dataset, a training run and a model; mismatches are refused.

A tokenizer's identity is its name and sha256 (``gpt2``: GPT-2's two files; a trained one: its tokenizer.json).
- A dataset's manifest records the tokenizer of its shards (``gpt2lab.data.shards.manifest_tokenizer``) and a
  trained tokenizer's tokenizer.json lies beside the shards.
- Training takes the model's vocabulary from it (``vocab_size``, ``padded_vocab_size`` rounded up to 64) and
  copies tokenizer.json + gpt2lab_tokenizer.json into the run folder, so a run folder samples, evaluates and
  exports by itself (the dataset or tok/ folder may move or go); every checkpoint's config.json records the
  tokenizer's name and sha256 (``train_state.tokenizer``), which the copy must match. A resumed run whose
  shards came from another tokenizer is refused, naming both.
- An SFT run (``gpt2lab sft``) encodes its conversations with the tokenizer of the model it fine-tunes, records
  and copies it the same way, so ``chat``/``sample``/``export`` of the SFT run find it. A resumed SFT run finds
  it in its own checkpoint (``resume_from``), so the base model need not exist any more.
- ``sample``/``eval``/``export`` find a model's tokenizer from that record (a checkpoint), or from the
  tokenizer.json + gpt2lab_tokenizer.json an export wrote (a Hugging Face folder); otherwise it is GPT-2's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gpt2lab.data.shards import dataset_tokenizer, manifest_tokenizer, read_manifest
from gpt2lab.errors import Gpt2LabError
from gpt2lab.tokenizer.bpe import (
    GPT2_HASH,
    TOKENIZER_JSON,
    TOKENIZER_META,
    TrainedTokenizer,
    get_tokenizer,
    load_tokenizer,
)

PAD_MULTIPLE = 64


def describe(record: dict) -> str:
    return f"{record['name']} (sha256 {record['hash'][:12]}, {record['vocab_size']:,} tokens)"


def record_of(tok) -> dict:
    return {"name": tok.name, "hash": tok.hash, "vocab_size": tok.vocab_size, "eot": tok.eot}


def _pretraining_data(cfg) -> Path | None:
    """The run's prepared dataset folder, when it pretrains on one that exists (SFT reads conversations)."""
    if getattr(getattr(cfg, "sft", None), "data", None) or getattr(getattr(cfg, "rl", None), "task", None):
        return None
    path = Path(cfg.data.path)
    return path if (path / "manifest.json").is_file() else None


def _tuned_model(cfg, resume_from: Path | None = None) -> str | None:
    """The model whose tokenizer a tuning run (SFT, RL) encodes with, else None: the model it tunes, or the
    run's own checkpoint when it resumes (which recorded that tokenizer; the tuned model may be gone)."""
    for name, active in (("sft", "data"), ("rl", "task")):
        section = getattr(cfg, name, None)
        if section is not None and getattr(section, active) and section.model:
            return str(resume_from) if resume_from is not None else section.model
    return None


def data_record(cfg, resume_from: Path | None = None) -> dict | None:
    """The tokenizer record of the run's shards, or of the model an SFT run fine-tunes where that is a trained
    one; None for GPT-2's under SFT, or no dataset yet (setup reports that)."""
    if _tuned_model(cfg):
        tok = model_tokenizer(_tuned_model(cfg, resume_from), load_gpt2=False)
        return record_of(tok) if tok is not None else None
    path = _pretraining_data(cfg)
    return manifest_tokenizer(read_manifest(path)) if path else None


def data_tokenizer_record(data_dir: str | Path) -> dict:
    """The tokenizer record of a prepared dataset folder."""
    return manifest_tokenizer(read_manifest(data_dir))


def agree(cfg, resume_from: Path | None) -> dict | None:
    """Fit the model's vocabulary to the shards' tokenizer; refuse to resume a run on another tokenizer's shards."""
    record = data_record(cfg, resume_from)
    if record is None:
        return None
    if record["hash"] != GPT2_HASH and not _tuned_model(cfg):  # SFT: [model] is the fine-tuned model's (chat.base)
        vocab = int(record["vocab_size"])
        rows = -(-vocab // PAD_MULTIPLE) * PAD_MULTIPLE
        if (cfg.model.vocab_size, cfg.model.padded_vocab_size) != (vocab, rows):
            print(f"model.vocab_size = {vocab:,} (padded to {rows:,}) from the tokenizer of {cfg.data.path}")
            cfg.model.vocab_size, cfg.model.padded_vocab_size = vocab, rows
    if resume_from is not None:
        check_same(
            checkpoint_record(resume_from), record, f"{resume_from}", f"the shards of {cfg.data.path} were made with"
        )
    return record


def check_same(model: dict, other: dict, model_where: str, other_what: str) -> None:
    """One error naming both tokenizers when a model's and another's (shards, --tokenizer) differ."""
    if model["hash"] != other["hash"]:
        raise Gpt2LabError(
            f"{model_where} was trained with the tokenizer {describe(model)}, but {other_what} {describe(other)}; "
            "use the model's tokenizer (`gpt2lab data prepare ... --tokenizer RUN_DIR`: a run folder holds its "
            "tokenizer.json)"
        )


def copy_into_run(cfg, run_dir: Path, resume_from: Path | None = None) -> None:
    """A trained tokenizer's files into the run folder, beside config.toml (SFT: the fine-tuned model's)."""
    path = _pretraining_data(cfg)
    if _tuned_model(cfg):
        tok = model_tokenizer(_tuned_model(cfg, resume_from), load_gpt2=False)
        path = tok.folder if isinstance(tok, TrainedTokenizer) else None
    if path is not None and (path / TOKENIZER_JSON).is_file() and path.resolve() != run_dir.resolve():
        for name in (TOKENIZER_JSON, TOKENIZER_META):
            if (path / name).is_file():
                shutil.copyfile(path / name, run_dir / name)


def run_tokenizer(cfg, resume_from: Path | None = None):
    """The tokenizer a run trains with (SFT: the fine-tuned model's; samples and HellaSwag during training)."""
    if _tuned_model(cfg):
        return model_tokenizer(_tuned_model(cfg, resume_from))
    path = _pretraining_data(cfg)
    return dataset_tokenizer(path) if path else get_tokenizer()


# ----------------------------------------------------------------------------- a model's tokenizer


def checkpoint_record(folder: Path) -> dict:
    """The tokenizer a checkpoint was trained with (a checkpoint from before this record: GPT-2's)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    record = (config.get("train_state") or {}).get("tokenizer") or config.get("tokenizer")
    return record or {"name": "gpt2", "hash": GPT2_HASH, "vocab_size": 50257, "eot": 50256}


def _find_trained(record: dict, folders: list[Path], where: Path) -> TrainedTokenizer:
    for folder in folders:
        if (folder / TOKENIZER_JSON).is_file():
            tok = TrainedTokenizer(folder)
            if tok.hash == record["hash"]:
                return tok
    raise Gpt2LabError(
        f"{where} was trained with the tokenizer {describe(record)}, but no tokenizer.json with that sha256 is in "
        f"{' or '.join(str(f) for f in folders)}; give it with --tokenizer DIR"
    )


def tokenizer_for(kind: str, folder: Path, override: str | None = None, load_gpt2: bool = True):
    """The tokenizer of a resolved model (``gpt2lab.interop.load.resolve``); ``override`` (--tokenizer) must agree.

    Where it is GPT-2's and ``load_gpt2`` is False: None (the caller looks GPT-2's files up itself).
    """
    gpt2 = get_tokenizer if load_gpt2 else lambda: None
    if kind == "checkpoint":
        record = checkpoint_record(folder)
        run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
        if override is None:
            return gpt2() if record["hash"] == GPT2_HASH else _find_trained(record, [folder, run_dir], folder)
        tok = load_tokenizer(override)
        check_same(record, record_of(tok), f"{folder}", f"--tokenizer {override} is")
        return tok
    if override is not None:
        return load_tokenizer(override)
    if (folder / TOKENIZER_META).is_file() and (folder / TOKENIZER_JSON).is_file():  # exported with a trained one
        return TrainedTokenizer(folder)
    return gpt2()


def model_tokenizer(spec: str, override: str | None = None, load_gpt2: bool = True):
    """The tokenizer of a ``--model`` spec (a run, checkpoint or Hugging Face folder, or a hub name)."""
    from gpt2lab.interop.load import resolve

    return tokenizer_for(*resolve(spec), override, load_gpt2)
