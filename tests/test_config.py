"""Configs: TOML presets onto dataclasses, --set overrides with type checks, clear errors."""

from __future__ import annotations

import tomllib

import pytest

from gpt2lab.cli.main import main
from gpt2lab.config import all_keys, build_config, load_config, to_toml
from gpt2lab.errors import Gpt2LabError
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def test_gpt2_124m_preset_is_the_reproduction_recipe():
    cfg = load_config(CONFIGS / "gpt2-124m.toml")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)
    assert (m.vocab_size, m.padded_vocab_size, m.dropout) == (50257, 50304, 0.0)
    assert (t.total_batch, t.micro_batch, t.max_steps, t.seed) == (2**19, 64, 19073, 1337)
    assert (o.lr, o.min_lr_ratio, o.warmup_steps, o.decay_steps) == (6e-4, 0.1, 715, 19073)
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (cfg.perf.compile, t.dtype, o.fused) == (None, "auto", None)  # on CUDA: compile, bf16, fused


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_every_preset_loads_and_round_trips_through_the_resolved_toml(name):
    cfg = load_config(CONFIGS / name)
    assert build_config(tomllib.loads(to_toml(cfg)), "resolved") == cfg


def test_set_overrides_parse_by_type_and_take_precedence():
    cfg = load_config(
        CONFIGS / "gpt2-124m.toml",
        ["optim.lr=1e-3", "train.micro_batch=32", "perf.compile=false", "data.shuffle=no", "optim.fused=auto",
         "eval.sample_prompt=ROMEO:", "model.dropout=0"],
    )  # fmt: skip
    assert cfg.optim.lr == 1e-3 and cfg.train.micro_batch == 32 and cfg.perf.compile is False
    assert cfg.data.shuffle is False and cfg.optim.fused is None and cfg.eval.sample_prompt == "ROMEO:"
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.train.total_batch == 2**19  # untouched values stay the file's


def test_decay_steps_auto_is_resolved_to_max_steps():
    cfg = build_config({"train": {"max_steps": 50}, "optim": {"decay_steps": "auto"}}, "x")
    assert cfg.optim.decay_steps == 50
    assert build_config({"train": {"max_steps": 50}, "optim": {"decay_steps": 40}}, "x").optim.decay_steps == 40


@pytest.mark.parametrize(
    ("values", "sets", "message"),
    [
        ({"optim": {"learning_rate": 1e-3}}, [], "unknown setting optim.learning_rate; did you mean optim.lr?"),
        ({}, ["train.micro_batchs=8"], "unknown setting train.micro_batchs; did you mean train.micro_batch?"),
        ({}, ["optim.max_steps=8"], "unknown setting optim.max_steps; did you mean train.max_steps?"),
        ({"optimizer": {"lr": 1.0}}, [], "unknown section [optimizer]; did you mean [optim]?"),
        ({"lr": 1.0}, [], "unknown setting lr; did you mean optim.lr?"),
        ({}, ["optim.lr"], "expected section.key=value"),
        ({}, ["optim.lr=fast"], "optim.lr must be a float, got 'fast'"),
        ({"train": {"micro_batch": 1.5}}, [], "train.micro_batch must be an int or 'auto', got 1.5"),
        ({"train": {"micro_batch": True}}, [], "train.micro_batch must be an int or 'auto', got True"),
        ({}, ["data.shuffle=maybe"], "data.shuffle must be a bool, got 'maybe'"),
        ({"model": {"n_head": 5}}, [], "n_embd (768) must be a multiple of n_head (5)"),
        ({"train": {"total_batch": 1000}}, [], "train.total_batch (1000) is not divisible"),
        ({"train": {"dtype": "float8"}}, [], "train.dtype must be auto, float32, bfloat16 or float16 (got 'float8')"),
        ({"optim": {"lr": -1.0}}, [], "optim.lr must be > 0"),
        ({"log": {"every": 0}}, [], "log.every must be >= 1"),
    ],
)
def test_bad_settings_are_one_clear_error(values, sets, message):
    with pytest.raises(Gpt2LabError) as e:
        build_config(values, "test.toml", sets)
    assert message in str(e.value)


def test_config_errors_reach_the_cli_as_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = 1e-3\nwarmup = 10\n")
    assert main(["train", str(bad)]) == 2
    assert "bad.toml: unknown setting optim.warmup; did you mean optim.warmup_steps?" in capsys.readouterr().err
    bad.write_text('import os; os.system("echo pwned")\n')  # a config is data, never code
    assert main(["train", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "give a CONFIG file" in capsys.readouterr().err


def test_every_key_is_documented_in_the_readme():
    readme = (REPO / "docs" / "training.md").read_text()  # the README's training section, now its own page
    section = readme[readme.index("<!-- section:train -->") : readme.index("<!-- /section:train -->")]
    missing = [key for key in all_keys() if f"`{key.split('.')[1]}`" not in section]
    assert not missing, f"README train section does not document {missing}"
