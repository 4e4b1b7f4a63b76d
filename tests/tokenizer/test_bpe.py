"""The GPT-2 tokenizer: round trips, tiktoken parity, every offline source and the offline error."""

import pytest
import tiktoken

import gpt2lab.tokenizer.bpe as tokmod
from gpt2lab.errors import Gpt2LabError
from gpt2lab.tokenizer.bpe import get_tokenizer

TEXTS = [
    "Hello, world! This is GPT-2.",
    "naïve café — “quotes”, 日本語, Ελληνικά, emoji 😀🎉👩‍👩‍👧",
    "   leading spaces, runs of     spaces, tabs\t\tand trailing   ",
    "lines\nand\n\n\nblank lines\r\n",
    "<|endoftext|>a document<|endoftext|>another",
    "",
]


@pytest.fixture(scope="module")
def reference():
    """tiktoken's own gpt2 encoding, read from TIKTOKEN_CACHE_DIR (set by conftest)."""
    return tiktoken.get_encoding("gpt2")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_equal_tiktoken(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, allowed_special={"<|endoftext|>"})
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_ordinary(text) == reference.encode_ordinary(text)


def test_endoftext_is_one_special_token_only_in_encode(tokenizer):
    assert tokenizer.eot == 50256
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert 50256 not in tokenizer.encode_ordinary("<|endoftext|>")  # plain text there
    assert tokenizer.decode([50256]) == "<|endoftext|>"


def test_batches_equal_single_calls(tokenizer):
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]
    assert tokenizer.encode_ordinary_batch(TEXTS) == [tokenizer.encode_ordinary(t) for t in TEXTS]
    assert tokenizer.decode_batch([tokenizer.encode(t) for t in TEXTS]) == TEXTS


def test_folder_source(shared_data, reference):
    folder = shared_data / "gpt2_tokenizer"
    tok = get_tokenizer(folder)
    assert tok.files == (folder / "encoder.json", folder / "vocab.bpe")
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text, allowed_special="all")


def test_tiktoken_cache_source(monkeypatch, shared_data, reference):
    monkeypatch.delenv("GPT2LAB_MIRROR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_data / "tiktoken_cache"))
    monkeypatch.setattr(tokmod, "_online", lambda *a, **k: pytest.fail("must not touch the network"))
    tok = get_tokenizer()
    assert tok.files is not None and all(f.parent == shared_data / "tiktoken_cache" for f in tok.files)
    assert tok.encode(TEXTS[1]) == reference.encode(TEXTS[1])


def test_no_files_and_no_network_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("GPT2LAB_MIRROR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokmod, "_online", lambda *a, **k: False)
    with pytest.raises(Gpt2LabError, match="not available offline") as e:
        get_tokenizer()
    assert "TIKTOKEN_CACHE_DIR" in str(e.value) and "encoder.json" in str(e.value)


def test_bad_tokenizer_folders_are_clear_errors(tmp_path, shared_data):
    with pytest.raises(Gpt2LabError, match="no encoder.json"):
        get_tokenizer(tmp_path)
    (tmp_path / "encoder.json").write_bytes((shared_data / "gpt2_tokenizer" / "encoder.json").read_bytes())
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nnot the real merges\n")
    with pytest.raises(Gpt2LabError, match="not OpenAI's GPT-2 files"):
        get_tokenizer(tmp_path)


def test_offline_error_names_the_mirror_it_looked_in(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2LAB_MIRROR", str(tmp_path))  # a mirror folder without gpt2_tokenizer/
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tokmod, "_online", lambda *a, **k: False)
    with pytest.raises(Gpt2LabError, match="not available offline") as e:
        get_tokenizer()
    assert f"{tmp_path / 'gpt2_tokenizer'} does not exist" in str(e.value)
