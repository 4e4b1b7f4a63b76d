"""Training a tokenizer (tokenizer/train.py) and the TrainedTokenizer interface: layout, round trips, special tokens,
parity with transformers, and `gpt2lab tokenizer compare`."""

from __future__ import annotations

import json
import random

import pytest

from gpt2lab.cli.main import main
from gpt2lab.tokenizer.bpe import (
    EOT_TOKEN,
    SPECIAL_TOKENS,
    TrainedTokenizer,
    get_tokenizer,
    load_tokenizer,
    token_byte_lengths,
)
from gpt2lab.tokenizer.train import PATTERNS, RESERVED, BpeConfig, documents, train_bpe

VOCAB = 512


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedTokenizer:
    """A 512-token tokenizer trained on 200K characters of Tiny Shakespeare's train split (~1 s)."""
    out = tmp_path_factory.mktemp("tok") / "sh512"
    train_bpe(documents(["shakespeare"], held_out=False), BpeConfig(VOCAB, "gpt4", max_chars=200_000), out)
    return TrainedTokenizer(out)


def random_text(rng: random.Random, n: int = 200, wild: bool = True) -> str:
    """Letters, digits, whitespace runs, emoji (with ZWJ sequences), CJK, combining marks, special-token lookalikes
    and (``wild``) any code point below U+3000, unassigned ones included."""
    pools = [
        "abcdefghijklmnopqrstuvwxyz ABCXYZ",
        "0123456789",
        " \t\n\r\n  ",
        "😀🎉👩\u200d👩\u200d👧🇫🇷",
        "日本語中文한국어",
        "e\u0301a\u0308\u0323o\u0302",  # combining marks after their base letters, and alone
        "<|>endoftext_",
    ] + (["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(30))] if wild else [])
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_training_layout_and_metadata(trained):
    meta = json.loads((trained.folder / "gpt2lab_tokenizer.json").read_text())
    assert trained.vocab_size == meta["vocab_size"] == VOCAB
    n = VOCAB - len(RESERVED)  # BPE tokens first, then <|endoftext|>, then the chat tokens in order (GPT-2's layout)
    assert trained.eot == meta["eot"] == n
    assert [trained.special_id(t) for t in SPECIAL_TOKENS] == list(range(n + 1, VOCAB))
    assert meta["padded_vocab_size"] == 512 and meta["config"]["pattern"] == "gpt4"
    assert meta["chars"] == 200_000
    with pytest.raises(Exception, match="not a special token"):
        trained.special_id("<|nope|>")


def test_round_trip_random_unicode(trained):
    rng = random.Random(0)
    for _ in range(50):
        text = random_text(rng)
        assert trained.decode(trained.encode_ordinary(text)) == text
        assert trained.decode(trained.encode(text)) == text
    # a lone surrogate is not valid UTF-8: U+FFFD instead, as tiktoken (GPT-2's Tokenizer) does
    gpt2 = get_tokenizer()
    for text in ("a\ud800b", "\udfff x \ud83d"):
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        assert trained.encode_ordinary(text) == trained.encode_ordinary(fixed)
        assert trained.decode(trained.encode(text)) == fixed == gpt2.decode(gpt2.encode(text))
        assert trained.encode_ordinary_batch([text, "ok"]) == [trained.encode_ordinary(fixed), trained.encode("ok")]


def test_special_tokens_never_come_from_plain_text(trained):
    rng = random.Random(1)
    text = "".join(random_text(rng, 20) + tok for tok in RESERVED) + EOT_TOKEN
    ordinary = trained.encode_ordinary(text)
    assert max(ordinary) < trained.eot  # no special id at all, <|endoftext|> included
    ids = trained.encode(text)  # <|endoftext|> alone is allowed, where it stands
    assert [i for i in ids if i >= trained.eot] == [trained.eot] * 2
    assert trained.decode(ids) == text
    assert trained.encode(EOT_TOKEN) == [trained.eot] and trained.decode([trained.special_id("<think>")]) == "<think>"


def test_batches_equal_single_calls(trained):
    rng = random.Random(2)
    texts = [random_text(rng, 50) for _ in range(20)] + ["", f"a{EOT_TOKEN}b"]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]
    assert trained.encode_ordinary_batch(texts) == [trained.encode_ordinary(t) for t in texts]
    assert trained.decode_batch([trained.encode(t) for t in texts]) == texts


def test_transformers_gives_identical_ids(trained):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained.folder))
    rng = random.Random(3)
    texts = [random_text(rng) for _ in range(20)] + [f"First doc.{EOT_TOKEN}Second: 1234567 apples."]
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == trained.encode(text)
        assert hf.decode(trained.encode(text)) == text


def test_gpt4_pattern_splits_digits_in_threes_gpt2s_does_not(tmp_path):
    corpus = ["123456789 987654321 5550123 " * 200, "The year 2024, page 12345."] * 3  # numbers worth merging
    lengths = {}
    for pattern in PATTERNS:
        train_bpe(iter(corpus), BpeConfig(400, pattern), tmp_path / pattern)
        tok = TrainedTokenizer(tmp_path / pattern)
        pieces = [tok.decode([i]).strip() for i in tok.encode_ordinary("123456789 987654321 5550123")]
        lengths[pattern] = max(len(p) for p in pieces)
    assert lengths["gpt4"] <= 3 < lengths["gpt2"]


def test_split_patterns_equal_their_references():
    """Our pre-tokenisation (Oniguruma, in the Rust library) splits as GPT-2's regex and tiktoken's cl100k_base
    pattern do (Python's `regex`, which reads possessive quantifiers as tiktoken's engine does)."""
    import inspect

    import regex
    import tiktoken_ext.openai_public as openai_public
    from tokenizers import Regex, pre_tokenizers

    source = inspect.getsource(openai_public.cl100k_base)
    cl100k = source.split('"pat_str": r"""')[1].split('"""')[0]  # tiktoken's own string
    references = {"gpt2": PATTERNS["gpt2"], "gpt4": cl100k}
    rng = random.Random(6)
    # assigned characters only: the two engines' Unicode tables differ on code points assigned lately
    texts = [random_text(rng, 150, wild=False) for _ in range(100)] + ["Hello   world\n\n  x 1234567 it's"]
    for name, reference in references.items():
        split = pre_tokenizers.Split(Regex(PATTERNS[name]), behavior="isolated")
        for text in texts:
            assert [piece for piece, _ in split.pre_tokenize_str(text)] == regex.findall(reference, text), (name, text)


def test_token_byte_lengths_add_up_to_utf8_bytes(trained):
    text = random_text(random.Random(4))
    for tok in (trained, get_tokenizer()):
        lengths = token_byte_lengths(tok)
        ids = tok.encode(text + EOT_TOKEN)
        assert sum(lengths[i] for i in ids) == len(text.encode())  # <|endoftext|> counts no bytes


def test_load_tokenizer_specs(trained, tmp_path):
    assert load_tokenizer("gpt2").name == "gpt2" and load_tokenizer(None).eot == 50256
    assert load_tokenizer(trained.folder).hash == trained.hash
    with pytest.raises(Exception, match="has no tokenizer.json .* and no encoder.json"):
        load_tokenizer(tmp_path)


def test_cli_train_and_compare(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(5)
    for i in range(5):
        (corpus / f"{i}.txt").write_text(" ".join(random_text(rng, 400) for _ in range(5)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus / "*.txt"), "--vocab-size", "300", "--out", str(out)]) == 0
    assert "300 tokens (model rows 320)" in capsys.readouterr().out
    assert main(["tokenizer", "train", str(corpus / "*.txt"), "--out", str(out)]) == 2  # never overwrites silently
    assert "already holds" in capsys.readouterr().err
    assert main(["tokenizer", "train", "shakespeare", "--vocab-size", "100", "--out", str(tmp_path / "x")]) == 2
    assert "--vocab-size must be at least" in capsys.readouterr().err
    report = tmp_path / "cmp.json"
    argv = ["tokenizer", "compare", str(out), "gpt2", "--on", "shakespeare", "--max-chars", "20000", "--json"]
    assert main([*argv, str(report)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(report.read_text())["rows"]
    gpt2 = get_tokenizer()
    held_out = next(documents(["shakespeare"], held_out=True))[:20000]  # Shakespeare's val split
    assert rows[1]["tokens"] == len(gpt2.encode_ordinary(held_out))
    assert rows[1]["bytes_per_token"] == pytest.approx(len(held_out.encode()) / rows[1]["tokens"])
    assert f"| gpt2 | 50,257 | {rows[1]['tokens']:,} |" in table
