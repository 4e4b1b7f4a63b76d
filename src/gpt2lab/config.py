"""A run's configuration: the section dataclasses composed, read from TOML, overridden from the CLI.

Each section's dataclass lives beside the code it configures ([model] -> ``GPTConfig``,
[data] -> ``DataConfig``, [optim] -> ``OptimConfig``, [train]/[eval]/[log] -> ``train.py``, [perf] -> ``perf.py``);
this module only composes them, and imports flow one way: config -> train, never back (``train.train``
takes the composed Config as an argument; ``gpt2lab.train.command`` is the CLI glue that builds one).
Precedence: ``--set section.key=value`` > the TOML file >
the dataclass defaults. Files hold plain values only (TOML, read with ``tomllib``), never
code. Every problem (unknown key, wrong type, impossible combination) is one
``Gpt2LabError`` raised before any work starts; an unknown key comes with the closest match.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gpt2lab.data.loader import DataConfig
from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.config import GPTConfig
from gpt2lab.rl.rollout import RLConfig
from gpt2lab.sft.data import SFTConfig, packing_problems
from gpt2lab.train.fsdp import config_problems
from gpt2lab.train.loop import EvalConfig, LogConfig, TrainConfig
from gpt2lab.train.optim import OptimConfig
from gpt2lab.train.perf import PerfConfig
from gpt2lab.train.reference import ReferenceConfig

# Optional fields (``X | None``) take this word for None: "derive it from other settings".
AUTO = "auto"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass
class Config:
    """Everything a training run needs, one dataclass per TOML section."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)  # figures measured with the preset
    sft: SFTConfig = field(default_factory=SFTConfig)  # fine-tuning on conversations (gpt2lab sft); off when empty
    rl: RLConfig = field(default_factory=RLConfig)  # RL with verifiable rewards (gpt2lab rl); off when rl.task is empty

    def to_dict(self) -> dict[str, dict]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_toml(self) -> str:
        """The resolved config as TOML (what gpt2lab.train.loop writes to RUN_DIR/config.toml)."""
        return to_toml(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _field_types(cls: type) -> dict[str, object]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def all_keys() -> list[str]:
    """Every settable key as 'section.key'."""
    return [f"{s}.{k}" for s, cls in SECTIONS.items() for k in _field_types(cls)]


# nanoGPT's names for the same settings, so that its users get pointed at ours
NANOGPT_NAMES = {
    "learning_rate": "optim.lr",
    "min_lr": "optim.min_lr_ratio",
    "warmup_iters": "optim.warmup_steps",
    "lr_decay_iters": "optim.decay_steps",
    "max_iters": "train.max_steps",
    "batch_size": "train.micro_batch",
    "gradient_accumulation_steps": "train.total_batch",
    "eval_interval": "eval.val_every",
    "eval_iters": "eval.val_batches",
    "dataset": "data.path",
}


def _closest(key: str) -> str | None:
    """The settable key a mistyped one most likely meant."""
    section, _, bare = key.rpartition(".")
    if bare in NANOGPT_NAMES:
        return NANOGPT_NAMES[bare]
    keys = all_keys()
    same_name = [k for k in keys if k.rpartition(".")[2] == bare]  # the right key in the wrong section
    if same_name:
        return same_name[0]
    in_section = [k.rpartition(".")[2] for k in keys if k.startswith(section + ".")] if section else []
    close = difflib.get_close_matches(bare, in_section, n=1, cutoff=0.6)
    if close:
        return f"{section}.{close[0]}"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return close[0] if close else None


def _unknown(key: str, where: str) -> Gpt2LabError:
    close = _closest(key)
    hint = f"; did you mean {close}?" if close else f"; the sections are {', '.join(SECTIONS)}"
    return Gpt2LabError(f"{where}: unknown setting {key}{hint}")


def _split_optional(typ: object) -> tuple[type, bool]:
    """(base type, allows None) for int, float | None, ..."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0], True
    return typ, False


def _coerce(value: object, typ: object, key: str, where: str, from_text: bool) -> object:
    """value checked (TOML) or parsed (--set text) as typ; one error naming the key otherwise."""
    base, optional = _split_optional(typ)
    if optional and (value is None or (isinstance(value, str) and value.lower() in (AUTO, "none"))):
        return None
    expected = f"{base.__name__}{f' or {AUTO!r}' if optional else ''}"
    bad = Gpt2LabError(f"{where}: {key} must be {'an' if expected[0] in 'i' else 'a'} {expected}, got {value!r}")
    if from_text:
        text = str(value).strip()
        try:
            if base is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                return text.lower() in _TRUE
            if base is int:
                return int(text)
            if base is float:
                number = float(text)
                if not math.isfinite(number):
                    raise ValueError
                return number
            return text
        except ValueError:
            raise bad from None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, bool):  # bool is an int subclass; true is not 1 here
        raise bad
    if not isinstance(value, base):
        raise bad
    return value


def parse_sets(sets: Iterable[str]) -> dict[str, str]:
    """--set 'section.key=value' strings as {'section.key': 'value'} (the last one wins)."""
    parsed = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise Gpt2LabError(f"--set {item}: expected section.key=value, e.g. --set optim.lr=3e-4")
        parsed[key.strip()] = value
    return parsed


def build_config(values: dict, source: str, sets: Iterable[str] = ()) -> Config:
    """A validated Config from nested plain values ({section: {key: value}}) and --set overrides."""
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    for section, table in values.items():
        if not isinstance(table, dict):  # a key outside any [section]
            raise _unknown(section, source)
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, list(SECTIONS), n=1)
            hint = f"did you mean [{close[0]}]?" if close else f"the sections are {', '.join(SECTIONS)}"
            raise Gpt2LabError(f"{source}: unknown section [{section}]; {hint}")
        types_ = _field_types(SECTIONS[section])
        for key, value in table.items():
            if key not in types_:
                raise _unknown(f"{section}.{key}", source)
            sections[section][key] = _coerce(value, types_[key], f"{section}.{key}", source, from_text=False)
    for dotted, text in parse_sets(sets).items():
        section, _, key = dotted.partition(".")
        types_ = _field_types(SECTIONS[section]) if section in SECTIONS else {}
        if key not in types_:
            raise _unknown(dotted, "--set")
        sections[section][key] = _coerce(text, types_[key], dotted, "--set", from_text=True)
    try:
        config = Config(**{name: SECTIONS[name](**kwargs) for name, kwargs in sections.items()})
    except (TypeError, ValueError) as e:  # e.g. GPTConfig: n_embd not a multiple of n_head
        raise Gpt2LabError(f"{source}: impossible setting: {e}") from None
    if config.optim.decay_steps is None:  # derived once, so a resume with more max_steps keeps the schedule
        config.optim.decay_steps = config.train.max_steps
    validate(config, source)
    return config


def read_toml(path: str | Path, missing_hint: str = "") -> dict:
    """A config file's values; one error for a missing file or invalid TOML."""
    path = Path(path)
    if not path.is_file():
        raise Gpt2LabError(f"{path}: config file not found{missing_hint}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise Gpt2LabError(f"{path}: not valid TOML ({e})") from None


def tuning_values(
    config_path: str | None, section: str, flags: dict, defaults: dict[str, dict], run: str, source_model: str
) -> tuple[dict, str]:
    """(values, source) of a run that tunes a model (gpt2lab sft, gpt2lab rl): the TOML, if given, with the
    command line's flags (those set) in [section] and ``defaults`` under the file's. [model] is refused: it is
    the tuned model's."""
    values, source = (read_toml(config_path), str(config_path)) if config_path else ({}, f"gpt2lab {section}")
    if "model" in values:
        raise Gpt2LabError(f"{source}: {run} run takes its [model] from {source_model} ({section}.model)")
    values.setdefault(section, {}).update({k: v for k, v in flags.items() if v})
    for name, values_default in defaults.items():
        values[name] = values_default | values.get(name, {})
    return values, source


def tuning_schedule(config: Config, lr: float, warmup_fraction: float, min_lr_ratio: float, weight_decay: float):
    """Replace [optim]'s schedule by a tuning section's: warmup over a share of train.max_steps, then a cosine
    to lr * min_lr_ratio at the last step (min_lr_ratio 1: constant)."""
    o, steps = config.optim, config.train.max_steps
    o.lr, o.min_lr_ratio, o.weight_decay = lr, min_lr_ratio, weight_decay
    o.warmup_steps, o.decay_steps = round(warmup_fraction * steps), steps


# {[optim] key a tuning schedule replaces: (the key that sets it in that stage, None when none does; None when a
# user's value carries over to that key as it is, else why it does not)}. Refused, never silently dropped.
Replaced = dict[str, tuple[str | None, str | None]]


def refuse_replaced_optim(values: dict, sets: dict[str, str], source: str, command: str, replaced: Replaced) -> None:
    """One error for each [optim] key in ``replaced`` that the user set, in the TOML (``values``) or with --set,
    naming the key to use instead: `gpt2lab sft --set optim.lr=3e-3` trained at sft.lr's default, unsaid.
    Only the user's own TOML and --set count; [optim]'s other keys (betas, grad_clip...) are honoured."""
    given = {k: (v, None) for k, v in values.get("optim", {}).items()}
    given |= {k.removeprefix("optim."): (v, "--set") for k, v in sets.items() if k.startswith("optim.")}
    problems = [
        _replaced(key, value, origin or source, command, *replaced[key])
        for key, (value, origin) in given.items()
        if key in replaced
    ]
    if problems:
        raise Gpt2LabError("; ".join(problems))


def _replaced(key: str, value: object, origin: str, command: str, target: str | None, meaning: str | None) -> str:
    where = "" if origin == "--set" else f"{origin}: "
    if target is None:
        return f"{where}optim.{key} has no effect in gpt2lab {command} ({meaning}): remove it"
    said = f"{where}optim.{key} is set by {target} in gpt2lab {command}"
    if meaning is not None:  # another unit (warmup steps vs a share of the run): no value to copy
        return f"{said} ({meaning}): set {target} instead"
    section, _, bare = target.partition(".")
    if origin == "--set":
        return f"{said}: use --set {target}={value}"
    return f"{said}: write {bare} = {_toml_value(value)} in [{section}]"


def load_config(path: str | Path, sets: Iterable[str] = ()) -> Config:
    """Read a TOML preset and apply --set overrides."""
    values = read_toml(path, " (the presets are in configs/)")
    return build_config(values, str(path), sets)


def validate(config: Config, source: str) -> None:
    """Raise one error listing every impossible combination (each section checks its own values)."""
    problems = []
    for name in SECTIONS:
        section = getattr(config, name)
        if hasattr(section, "validate"):
            problems += section.validate(config.model) if name == "train" else section.validate()
    problems += config_problems(config)  # train.parallel=fsdp with what it cannot run (gpt2lab.train.fsdp)
    if config.train.parallel == "fsdp" and config.rl.task:  # rollouts and the base weights need the whole model
        problems.append("rl with train.parallel=fsdp is not supported yet: use ddp (the default), which keeps a "
                        "whole policy on each rank for its rollouts")  # fmt: skip
    problems += packing_problems(config.sft, config.perf)  # a document mask needs a kernel that takes masks
    if problems:
        raise Gpt2LabError(f"{source}: " + "; ".join(problems))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string uses the same escapes
    if isinstance(value, dict):  # an inline table, e.g. reference.val_loss = { "100" = 6.1 }
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def to_toml(config: Config) -> str:
    """The resolved config as TOML (plain values; None written as "auto", which reads back as None)."""
    lines = ["# resolved configuration of this run (gpt2lab train); defaults included"]
    for section, values in config.to_dict().items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(AUTO if value is None else value)}")
    return "\n".join(lines) + "\n"
