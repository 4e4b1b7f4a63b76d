"""The offline data mirror: one lookup for every module, and a wrong value named with what it resolved to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gpt2lab
from gpt2lab.cli.main import main
from gpt2lab.errors import Gpt2LabError


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working directory that does not hold the mirror, with GPT2LAB_MIRROR relative: 'data' (as from the repo)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT2LAB_MIRROR", "data")
    return tmp_path


def _missing(value: str, resolved: Path) -> str:
    return f"GPT2LAB_MIRROR is set to {value} (resolved to {resolved}), which does not exist"


def test_relative_mirror_from_another_directory_names_value_and_resolution(elsewhere):
    from gpt2lab.tokenizer.bpe import get_tokenizer

    with pytest.raises(Gpt2LabError) as e:
        get_tokenizer()  # before: a silent fall-back, then "not available offline" without the variable's value
    assert _missing("data", elsewhere / "data") in str(e.value)


def test_every_user_of_the_mirror_gives_the_same_message(elsewhere, capsys):
    from gpt2lab.eval.common import mirror_file

    with pytest.raises(Gpt2LabError, match=re.escape(_missing("data", elsewhere / "data"))):
        mirror_file("lambada/lambada_test.jsonl")
    assert main(["data", "prepare", "shakespeare", "--out", str(elsewhere / "ds")]) == 2
    assert _missing("data", elsewhere / "data") in capsys.readouterr().err
    assert not (elsewhere / "ds").exists()
    assert main(["data", "prepare", "shakespeare", "--mirror", "nowhere", "--out", str(elsewhere / "ds")]) == 2
    assert f"--mirror is nowhere (resolved to {elsewhere / 'nowhere'}), which does not exist" in capsys.readouterr().err


def test_relative_mirror_that_exists_is_made_absolute(monkeypatch, shared_data):
    from gpt2lab.mirror import mirror_dir
    from gpt2lab.tokenizer.bpe import get_tokenizer

    monkeypatch.chdir(shared_data.parent)
    monkeypatch.setenv("GPT2LAB_MIRROR", shared_data.name)
    assert mirror_dir() == shared_data and mirror_dir().is_absolute()
    folder = shared_data / "gpt2_tokenizer"
    assert get_tokenizer().files == (folder / "encoder.json", folder / "vocab.bpe")
    monkeypatch.delenv("GPT2LAB_MIRROR")
    assert mirror_dir() is None and mirror_dir(str(shared_data)) == shared_data


def test_one_module_reads_the_variable():
    """tokenizer.py, data/sources.py and eval/common.py each read $GPT2LAB_MIRROR once; now only mirror.py does."""
    src = Path(gpt2lab.__file__).parent
    readers = sorted(
        p.relative_to(src).as_posix()
        for p in src.rglob("*.py")
        if re.search(r"environ(\.get\(|\[)\s*[\"']GPT2LAB_MIRROR", p.read_text())
    )
    assert readers == [], readers  # mirror.py reads it through its ENV constant
    assert 'ENV = "GPT2LAB_MIRROR"' in (src / "mirror.py").read_text()
