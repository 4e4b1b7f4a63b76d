"""Benchmarks that compare: interleaved variants, a ratio with its interval; preset reference figures in `train`."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from gpt2lab.cli.main import main
from gpt2lab.config import build_config, load_config, to_toml
from tests.train.test_loop import TINY as TRAIN_TINY

TINY = {**TRAIN_TINY, "train": {**TRAIN_TINY["train"], "total_batch": 128, "save_every": 0}}  # one micro-step
SMALL_VOCAB = {"vocab_size": 256, "padded_vocab_size": 256}  # the bench tests need no tokenizer: steps of ~ms
STRICT = 0.999  # the tests' confidence: an A/A test that reads "different" 1 time in 20 would be a flaky test


def write_config(folder: Path, **sections) -> Path:
    """TINY with sections={"train": {...}} merged in, written as TOML by gpt2lab's own writer."""
    values = {name: dict(table) for name, table in TINY.items()}
    for name, table in sections.items():
        values.setdefault(name, {}).update(table)
    path = folder / "tiny.toml"
    path.write_text(to_toml(build_config(values, "test")))
    return path


@pytest.fixture
def strict(monkeypatch):
    import gpt2lab.bench.train as bench

    monkeypatch.setattr(bench, "CONFIDENCE", STRICT, raising=False)  # also runs (and fails) on a bench without it


def _verdict(out: str) -> str:
    return next(line for line in out.splitlines() if " vs plain: " in line)


# ----------------------------------------------------------------------------- the interval


def test_ratio_interval_is_the_order_statistics_of_the_per_round_ratios():
    from gpt2lab.bench.stats import ratio

    a = [1.0] * 10
    b = [1 / r for r in (0.90, 0.95, 0.97, 0.99, 1.00, 1.01, 1.02, 1.04, 1.10, 1.30)]  # per-round ratios a/b
    r = ratio(a, b, confidence=0.95)
    # n = 10: k = 2 covers the median with 1 - 2 * 11/1024 = 97.9%; k = 3 only with 89.1%
    assert (r.low, r.high) == pytest.approx((0.95, 1.10)) and r.confidence == pytest.approx(1 - 22 / 1024)
    assert r.median == pytest.approx(1.005) and r.verdict == "no measurable difference"
    faster = ratio(a, [x / 1.5 for x in b], confidence=0.95)
    assert faster.verdict == "faster" and faster.low == pytest.approx(1.425)
    assert "optimised vs plain: 1.51x faster (97.9% interval 1.425x-1.650x" in faster.describe("plain", "optimised")
    few = ratio([1.0] * 3, [0.5] * 3, confidence=0.95)  # 3 rounds cannot reach 95%: the full range, 75%
    assert few.confidence == pytest.approx(0.75) and few.verdict == "faster"


# ----------------------------------------------------------------------------- A/A and a slower variant


def test_a_a_comparison_reports_no_measurable_difference(tmp_path, capsys, strict):
    """`--compare` on a config whose [perf] is the plain path: the same variant twice.

    The verdict's interval is a 97.9% one, so an honest A/A comparison reports a "difference" about 2% of
    the time (more on loaded cores). One retry: a comparator that is right reports a difference twice in a
    row about 0.04% of the time; one biased toward "different" (or "slower") still fails both times.
    """
    cfg = write_config(tmp_path, model=SMALL_VOCAB)
    verdicts = []
    for _ in range(2):
        assert main(["bench", "train", "--config", str(cfg), "--compare", "--steps", "20"]) == 0
        out = capsys.readouterr().out
        assert "3 warmup + 10 rounds x 2 timed steps, variants interleaved" in out
        rows = [row.split("|") for row in out.splitlines() if row.lstrip().startswith(("plain |", "optimised |"))]
        finals = [row[5].strip() for row in rows]
        assert len(finals) == 2 and finals[0] == finals[1]  # the same function: the same loss after the same steps
        line = _verdict(out)
        verdicts.append(line)
        if "optimised vs plain: no measurable difference" in line:
            low, high = map(float, re.search(r"interval ([\d.]+)x-([\d.]+)x", line).groups())
            assert low <= 1.0 <= high
            return
    pytest.fail(f"an A/A comparison reported a difference twice in a row: {verdicts}")


def test_a_really_slower_variant_is_reported_slower(tmp_path, capsys, monkeypatch):
    """The second variant sleeps 4x its own step time after each step (5x slower): it must read slower."""
    from gpt2lab.bench.train import Variant

    step = Variant.step

    def slowed(self):
        seconds = step(self)
        if self.label == "optimised":  # relative to its own step, so that a stall of the machine slows both
            time.sleep(4 * seconds)
            seconds *= 5
        return seconds

    monkeypatch.setattr(Variant, "step", slowed)
    cfg = write_config(tmp_path, model=SMALL_VOCAB)
    assert main(["bench", "train", "--config", str(cfg), "--compare", "--steps", "20"]) == 0
    line = _verdict(capsys.readouterr().out)
    assert re.search(r"optimised vs plain: [\d.]+x slower", line), line
    high = float(re.search(r"interval [\d.]+x-([\d.]+)x", line).group(1))
    assert high < 1.0


def test_interleave_alternates_the_order_every_round():
    from gpt2lab.bench.train import interleave

    calls = []
    steps = [lambda v=v: calls.append(v) or 0.0 for v in "AB"]
    times = interleave(steps, warmup=1, rounds=3, per_round=2)
    assert "".join(calls) == "AB" + "AABB" + "BBAA" + "AABB"  # warm-up in turn, then A B / B A / A B
    assert [len(t) for t in times] == [3, 3]


# ----------------------------------------------------------------------------- preset reference figures


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory, shared_data) -> Path:
    from gpt2lab.data.prepare import Settings, prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare(Settings("shakespeare", shard_size=10_000_000), out, workers=1)
    return out


def test_train_prints_the_presets_figures_beside_the_runs_own(tmp_path, shakespeare, capsys):
    reference = {
        "val_loss": {"0": 10.9, "4": 9.87},
        "tokens_per_s": 1234.0,
        "device": "CPU, 2 cores",
        "date": "2026-11-25",
        "torch": "2.13.0",
        "val_loss_band_step0": 5.0,  # step 0 (~10.8 nats) lands within it whatever the machine
        "val_loss_band": 0.5,  # 9.87 at step 4 is the wrong figure for this tiny model: its loss is higher
    }
    cfg = write_config(tmp_path, data={"path": str(shakespeare)}, reference=reference)
    assert 'val_loss = { "0" = 10.9, "4" = 9.87 }' in cfg.read_text()  # written and read back as a TOML table
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    where = "measured on CPU, 2 cores, 2026-11-25, torch 2.13.0"
    assert out.count(f"preset reference ({where}): 1,234 tok/s; val loss at steps 0, 4 (expected band ±0.5") == 1
    within, outside = r"[-+]\d\.\d{3}: within the expected band", r"\+\d\.\d{3}: outside the expected band"
    assert re.search(rf"step      0 \| val loss [\d.]+ \(preset: 10\.9 on CPU, 2 cores; {within}, ±5\)\n", out), out
    assert re.search(rf"step      4 \| val loss [\d.]+ \(preset: 9\.87 on CPU, 2 cores; {outside}, ±0\.5\)\n", out), out
    assert re.search(r"step      2 \| val loss [\d.]+\n", out)  # no figure for step 2: nothing beside it
    # a resume rebuilds the config from the checkpoint: the table survives the JSON round trip
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.max_steps=6"]) == 0
    assert "1,234 tok/s; val loss at steps 0, 4" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ({"val_loss": {"100": "low"}}, "reference.val_loss: '100' = 'low' must be a step"),
        ({"val_loss": {"late": 6.1}}, "reference.val_loss: 'late' = 6.1 must be a step"),
        ({"val_loss": 6.1}, "reference.val_loss must be a dict, got 6.1"),
        ({"tokens_per_s": "fast"}, "reference.tokens_per_s must be a float or 'auto', got 'fast'"),
    ],
)
def test_a_bad_reference_value_is_one_config_error(tmp_path, capsys, reference, message):
    values = {name: dict(table) for name, table in TINY.items()} | {"reference": reference}
    text = "".join(
        f"[{section}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items()) for section, table in values.items()
    )
    (tmp_path / "bad.toml").write_text(text)
    assert main(["train", str(tmp_path / "bad.toml"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + " }"
    return f'"{value}"' if isinstance(value, str) else repr(value).lower() if isinstance(value, bool) else repr(value)


def test_reference_val_loss_can_be_set_from_the_command_line(tmp_path):
    cfg = load_config(write_config(tmp_path), ["reference.val_loss={ 100 = 6.1 }"])
    assert cfg.reference.at(100) == 6.1 and cfg.reference.at(0) is None


def test_the_shakespeare_preset_carries_its_measured_figures():
    from tests.conftest import REPO

    ref = load_config(REPO / "configs" / "shakespeare.toml").reference
    assert ref.at(0) is not None and ref.at(300) is not None and ref.tokens_per_s
    assert ref.device and ref.date and ref.torch


@pytest.mark.parametrize("argv, why", [
    (["--long-prompt", "100"], "--long-prompt N is the big request of --long-request K"),
    (["--turns", "2", "--long-request", "2"], "two different benchmarks"),
    (["--turns", "0"], "--turns must be >= 1"),
    (["--long-request", "2", "--long-prompt", "3"], "--long-prompt tokens (>= 16)"),
])  # fmt: skip
def test_bench_serve_refuses_options_it_would_ignore_before_building_anything(argv, why, capsys):
    assert main(["bench", "serve", *argv]) == 2
    assert why in capsys.readouterr().err
