"""A preset's [reference]: the verdict beside each figure (within the expected band or outside it), its band fields."""

from __future__ import annotations

import tomllib

import pytest

from gpt2lab.config import build_config
from gpt2lab.errors import Gpt2LabError
from gpt2lab.train.reference import ReferenceConfig, speed_note, val_loss_note
from tests.conftest import REPO


def _ref() -> ReferenceConfig:
    """Two figures, with bands other than the defaults (so the note must read them from the config)."""
    figures = {"0": 10.815, "50": 6.293}
    return ReferenceConfig(val_loss=figures, device="CPU", val_loss_band=0.15, val_loss_band_step0=0.02)


@pytest.mark.parametrize(
    ("step", "loss", "expected"),
    [
        (50, 6.3715, " (preset: 6.293 on CPU; +0.079: within the expected band, ±0.15)"),  # the fresh machine
        (50, 6.1431, " (preset: 6.293 on CPU; -0.150: within the expected band, ±0.15)"),  # the edge, as printed
        (50, 6.4441, " (preset: 6.293 on CPU; +0.151: outside the expected band, ±0.15)"),
        (50, 6.1, " (preset: 6.293 on CPU; -0.193: outside the expected band, ±0.15)"),
        (0, 10.8145, " (preset: 10.815 on CPU; +0.000: within the expected band, ±0.02)"),
        (0, 10.9, " (preset: 10.815 on CPU; +0.085: outside the expected band, ±0.02)"),  # step 0's tighter band
    ],
)
def test_the_val_loss_note_says_whether_the_run_is_within_the_band(step, loss, expected):
    assert val_loss_note(_ref(), step, loss) == expected
    assert val_loss_note(_ref(), 100, loss) == ""  # no figure at this step: nothing beside the loss


def test_the_start_of_a_run_names_the_band():
    assert "val loss at steps 0, 50 (expected band ±0.15, ±0.02 at step 0)" in speed_note(_ref())


def _reference(**fields) -> ReferenceConfig:
    return build_config({"reference": fields}, "test.toml").reference


def test_the_band_fields_have_defaults_and_can_be_set():
    assert _reference().band(0) < _reference().band(50)  # the untrained model is the most repeatable figure
    ref = _reference(val_loss_band=0.3, val_loss_band_step0=0)  # 0: the figure itself, nothing either side
    assert (ref.band(0), ref.band(1), ref.band(300)) == (0.0, 0.3, 0.3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"val_loss_band": -0.1}, "reference.val_loss_band must be a finite number >= 0, in nats (got -0.1)"),
        ({"val_loss_band_step0": -1}, "reference.val_loss_band_step0 must be a finite number >= 0, in nats (got -1"),
        ({"val_loss_band": float("nan")}, "reference.val_loss_band must be a finite number >= 0, in nats (got nan)"),
        ({"val_loss_band": "wide"}, "reference.val_loss_band must be a float, got 'wide'"),
        ({"val_loss_tolerance": 0.1}, "unknown setting reference.val_loss_tolerance; did you mean reference.val_loss"),
    ],
)
def test_a_bad_or_unknown_band_field_is_refused(fields, message):
    with pytest.raises(Gpt2LabError) as error:
        _reference(**fields)
    assert message in str(error.value)


def test_a_band_set_from_the_command_line_is_validated_too():
    with pytest.raises(Gpt2LabError, match=r"reference\.val_loss_band must be a finite number >= 0"):
        build_config({}, "test.toml", ["reference.val_loss_band=-0.05"])


def test_the_shakespeare_preset_states_its_band():
    """The preset writes its band out (with how it was measured) rather than leaning on the default."""
    table = tomllib.loads((REPO / "configs" / "shakespeare.toml").read_text())["reference"]
    assert 0 < table["val_loss_band_step0"] < table["val_loss_band"]
