"""The [reference] section: figures measured with a preset, printed beside a run's own ("is my loss normal?").

A preset carries the val loss it reached at a few steps and the tokens/s it ran at, with the device,
date and torch version of that measurement (or the source of published figures). ``gpt2lab train``
prints each figure beside the run's value at the same step, so a user sees at once whether a run is
on track. TOML table keys are strings, so the steps are written as strings: ``{ 0 = 10.9, 300 = 5.3 }``.

A run never repeats those figures digit for digit off the machine they were measured on: float32 sums
round differently with another thread count, CPU (BLAS kernels) or device, and training amplifies the
difference step by step. So each figure is printed with a verdict, whether the run is within
``val_loss_band`` nats of it (``val_loss_band_step0`` at step 0, where nothing has been trained yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Defaults when a preset's [reference] names no band: the Shakespeare preset's, whose comment has the measurements.
# Its runs on other BLAS kernels and thread counts drift up to 0.16 nats from its figures during training.
VAL_LOSS_BAND = 0.25
VAL_LOSS_BAND_STEP0 = 0.01  # step 0 is the untrained model: the same to 4 decimals on every kernel and thread count


@dataclass
class ReferenceConfig:
    """The [reference] section: what this preset measured, and where."""

    val_loss: dict = field(default_factory=dict)  # {step (a string key in TOML): val loss at that step}
    tokens_per_s: float | None = None  # training tokens/s on `device`
    device: str = ""  # what the figures were measured on, e.g. "CPU, 2 cores (shared)"
    date: str = ""  # when, e.g. "2026-11-25"
    torch: str = ""  # the torch version used
    source: str = ""  # where published figures come from (empty: measured with this preset by gpt2lab)
    val_loss_band: float = VAL_LOSS_BAND  # nats either side of a trained step's figure that a healthy run reads
    val_loss_band_step0: float = VAL_LOSS_BAND_STEP0  # the same at step 0: the untrained model, nearly deterministic

    def __post_init__(self) -> None:
        if isinstance(self.val_loss, str):  # from --set reference.val_loss='{ 100 = 6.1 }'
            self.val_loss = _parse_table(self.val_loss)

    def validate(self) -> list[str]:
        if not isinstance(self.val_loss, dict):
            return [f"reference.val_loss must be a table of step = loss, e.g. {{ 100 = 6.1 }} (got {self.val_loss!r})"]
        problems = [
            f"reference.val_loss: {step!r} = {loss!r} must be a step (an integer >= 0) = a finite number"
            for step, loss in self.val_loss.items()
            if _step(step) is None or not _number(loss)
        ]
        if self.tokens_per_s is not None and not self.tokens_per_s > 0:
            problems.append(f"reference.tokens_per_s must be > 0 (got {self.tokens_per_s})")
        for name in ("val_loss_band", "val_loss_band_step0"):  # TOML reads nan and inf too: neither is a band
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                problems.append(f"reference.{name} must be a finite number >= 0, in nats (got {getattr(self, name)})")
        return problems

    def band(self, step: int) -> float:
        """How far (in nats, either side) a run's val loss may sit from the figure at this step and be normal."""
        return self.val_loss_band_step0 if step == 0 else self.val_loss_band

    def at(self, step: int) -> float | None:
        """The reference val loss at this step, if the preset has one."""
        return next((float(v) for k, v in self.val_loss.items() if _step(k) == step), None)

    def where(self) -> str:
        """Where the figures come from: "measured on <device>, <date>, torch <version>" or the published source."""
        if self.source:
            return self.source
        parts = [f"measured on {self.device or 'an unnamed device'}", self.date, self.torch and f"torch {self.torch}"]
        return ", ".join(p for p in parts if p)


def _step(key: object) -> int | None:
    text = str(key).strip()
    return int(text) if text.isdigit() else None


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_table(text: str) -> object:
    """A TOML inline table given as text; the text itself when it is not one (validate then says so)."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def val_loss_note(ref: ReferenceConfig, step: int, loss: float) -> str:
    """' (preset: 6.1 on CPU, 2 cores; +0.042: within the expected band, ±0.15)' after a val loss line at a
    step the preset has a figure for, else ''. The verdict spares the user comparing digits that a run on
    another machine never repeats exactly."""
    value = ref.at(step)
    if value is None:
        return ""
    band, off = ref.band(step), round(loss - value, 3) + 0.0  # judged as shown, so the two agree (+ 0.0: no -0.000)
    verdict = "within the expected band" if abs(off) <= band else "outside the expected band"
    where = f" on {ref.device}" if ref.device and not ref.source else ""
    return f" (preset: {value:g}{where}; {off:+.3f}: {verdict}, ±{band:g})"


def speed_note(ref: ReferenceConfig) -> str | None:
    """The preset's figures and where they come from, once at the start of a run; None when it has none."""
    if ref.tokens_per_s is None and not ref.val_loss:
        return None
    speed = f"{ref.tokens_per_s:,.0f} tok/s; " if ref.tokens_per_s is not None else ""
    steps = ", ".join(str(_step(k)) for k in ref.val_loss)
    band = f" (expected band ±{ref.val_loss_band:g}, ±{ref.val_loss_band_step0:g} at step 0)" if steps else ""
    return (
        f"preset reference ({ref.where()}): {speed}val loss at steps {steps or 'none'}{band}, shown beside this run's"
    )
