"""Checkpoint folders and --model resolution: round trips and one clear error per broken input."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.checkpoint.folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    checkpoint_dirs,
    find_latest,
    is_checkpoint,
    load_model,
    read_json,
    save_model,
)
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop.load import load_model as load_spec
from gpt2lab.interop.load import resolve
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(block_size=16, vocab_size=100, padded_vocab_size=128, n_layer=2, n_head=2, n_embd=16) | overrides
    return GPT(GPTConfig(**cfg)).eval()


def test_round_trip_keeps_weights_config_tie_and_extra(tmp_path):
    model = tiny()
    save_model(model, tmp_path / "ck", extra={"step": 7})
    config = read_json(tmp_path / "ck" / CONFIG_NAME)
    assert config["format"] == "gpt2lab" and config["format_version"] == 1 and config["step"] == 7
    assert "lm_head.weight" not in load_file(tmp_path / "ck" / WEIGHTS_NAME)  # the tied tensor is stored once
    loaded = load_model(tmp_path / "ck")
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    idx = torch.randint(0, 100, (1, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_loading_spec_forms(tmp_path):
    save_model(tiny(), tmp_path / "ck")
    assert resolve(str(tmp_path / "ck")) == ("checkpoint", tmp_path / "ck")
    run = tmp_path / "run"
    for step in (5, 100, 20):
        save_model(tiny(seed=step), run / "checkpoints" / f"step_{step:07d}")
    (run / "checkpoints" / "step_0000200.tmp").mkdir()  # an unfinished save is never picked
    (run / "checkpoints" / "step_0000300").mkdir()  # nor a folder without config.json
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000005", "step_0000020", "step_0000100"]
    assert find_latest(run) == run / "checkpoints" / "step_0000100"
    assert resolve(str(run)) == ("checkpoint", run / "checkpoints" / "step_0000100")
    model = load_spec(str(run), dtype="bfloat16")
    assert not model.training and model.lm_head.weight.dtype == torch.bfloat16
    assert find_latest(tmp_path / "nothing") is None
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(Gpt2LabError, match="a run folder without a checkpoint yet"):
        resolve(str(tmp_path / "empty_run"))


def test_is_checkpoint(tmp_path):
    assert not is_checkpoint(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    assert not is_checkpoint(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"model_type": "gpt2"}')
    assert not is_checkpoint(tmp_path)
    save_model(tiny(), tmp_path)
    assert is_checkpoint(tmp_path)


def test_broken_checkpoints_are_clear_errors_naming_the_file(tmp_path):
    save_model(tiny(), tmp_path / "ck")
    weights = tmp_path / "ck" / WEIGHTS_NAME
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(Gpt2LabError, match=f"{re.escape(str(weights))}.*truncated or corrupt"):
        load_model(tmp_path / "ck")

    weights.write_bytes(data)
    config = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())
    config["model"]["n_embd"] = 32
    (tmp_path / "ck" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(Gpt2LabError, match=f"{re.escape(str(weights))}.*has shape"):
        load_model(tmp_path / "ck")

    config["model"] |= {"n_embd": 16, "n_layer": 3}
    (tmp_path / "ck" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(Gpt2LabError, match="missing .*h.2"):
        load_model(tmp_path / "ck")

    config["model"] |= {"n_layer": 2, "n_head": 3}  # 16 is not a multiple of 3
    (tmp_path / "ck" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(Gpt2LabError, match="invalid model config"):
        load_model(tmp_path / "ck")

    config["model"]["n_head"] = 2
    (tmp_path / "ck" / CONFIG_NAME).write_text(json.dumps(config))
    weights.unlink()
    with pytest.raises(Gpt2LabError, match=f"{re.escape(str(weights))}: file not found"):
        load_model(tmp_path / "ck")
    with pytest.raises(Gpt2LabError, match="not a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(Gpt2LabError, match="no such checkpoint folder"):
        load_model(tmp_path / "missing")


@pytest.fixture(params=[(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)], ids=["umask022", "umask077"])
def umask(request):
    """(file mode, folder mode) that plain open() and mkdir() give under the umask set for the test."""
    import os

    mask, file_mode, dir_mode = request.param
    old = os.umask(mask)
    yield file_mode, dir_mode
    os.umask(old)


def _modes(folder) -> dict[str, int]:
    """Permission bits of a folder and everything in it, by path relative to its parent."""
    import stat

    paths = [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder.parent)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def test_checkpoints_and_exports_keep_the_umask_permissions(tmp_path, umask, capsys):
    """Others on a shared machine read what the umask lets them: no 0600 files or 0700 folders forced."""
    from gpt2lab.checkpoint.folder import rng_state, save_training_checkpoint
    from gpt2lab.cli.main import main

    file_mode, dir_mode = umask
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    step = save_training_checkpoint(tmp_path / "run", 1, model, optimizer, {"step": 1}, rng_state()[0])
    plain = save_model(model, tmp_path / "plain")
    assert main(["export", str(plain), str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    for folder in (step, plain, tmp_path / "hf"):
        modes = _modes(folder)
        assert len(modes) >= 3, modes  # the folder, its weights and its config at least
        expected = {path: dir_mode if (folder.parent / path).is_dir() else file_mode for path in modes}
        assert {p: oct(m) for p, m in modes.items()} == {p: oct(m) for p, m in expected.items()}
