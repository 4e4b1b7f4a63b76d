"""Shards made with a trained tokenizer: the tokenizer recorded, 32-bit tokens above 65,535, training takes the
vocabulary from the shards and refuses another tokenizer's; sample, eval and export use the run's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.cli.main import main
from gpt2lab.data.loader import ShardLoader
from gpt2lab.data.prepare import Settings, prepare
from gpt2lab.data.shards import HEADER_BYTES, open_shard, read_header, write_shard
from gpt2lab.tokenizer.bpe import EOT_TOKEN, TrainedTokenizer
from gpt2lab.tokenizer.train import RESERVED
from tests.tokenizer.test_train import trained  # noqa: F401 (fixture)
from tests.train.test_loop import shakespeare_data, write_config  # noqa: F401 (fixtures)


def header(path: Path) -> list[int]:
    return np.fromfile(path, dtype="<i4", count=3).tolist()


def val_text(mirror: Path) -> str:
    text = (mirror / "tinyshakespeare" / "input.txt").read_text()
    return text[int(len(text) * 0.9) :]


def test_32bit_shard_round_trips(tmp_path):
    tokens = np.array([0, 1, 65535, 65536, 2**20, 2**31 - 1], dtype=np.uint32)
    write_shard(tmp_path / "a.bin", tokens, tokens.dtype)
    assert header(tmp_path / "a.bin") == [20240801, 7, 6]  # llm.c's uint32 ("llama-3") header
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES + 4 * 6
    assert open_shard(tmp_path / "a.bin").tolist() == tokens.tolist()
    small = np.array([5, 50256], dtype=np.uint16)
    write_shard(tmp_path / "b.bin", small)  # uint16: llm.c's GPT-2 header, as before
    assert header(tmp_path / "b.bin") == [20240520, 1, 2] and open_shard(tmp_path / "b.bin").tolist() == [5, 50256]
    with pytest.raises(Exception, match="does not fit the uint16"):
        write_shard(tmp_path / "c.bin", tokens)


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory, trained) -> Path:  # noqa: F811
    """A tokenizer of 66,048 tokens whose <|endoftext|> is id 65,988: its shards need 32 bits."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(trained.folder / "tokenizer.json"))
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    assert added == set(RESERVED)
    data = json.loads(tok.to_str())
    data["added_tokens"] = []  # the BPE part alone, then 65,500 filler tokens, then the special tokens
    bare = Tokenizer.from_str(json.dumps(data))
    bare.add_special_tokens([f"<|filler_{i}|>" for i in range(66048 - len(RESERVED) - bare.get_vocab_size())])
    bare.add_special_tokens(list(RESERVED))
    folder = tmp_path_factory.mktemp("big") / "tok66k"
    folder.mkdir()
    bare.save(str(folder / "tokenizer.json"))
    return folder


def test_a_vocabulary_above_65535_gives_32bit_shards(tmp_path, big_vocab, shared_data):
    tok = TrainedTokenizer(big_vocab)
    assert tok.vocab_size == 66048 and tok.eot == 66048 - len(RESERVED) > 65535
    out = tmp_path / "data"
    manifest = prepare(Settings("shakespeare", shard_size=10_000_000), out, workers=1, quiet=True, tokenizer=big_vocab)
    assert manifest["shard_format"] == {"header_int32": 256, "magic": 20240801, "version": 7, "dtype": "uint32"}
    assert manifest["tokenizer"]["hash"] == tok.hash and manifest["settings"]["tokenizer"] == tok.hash
    assert header(out / "val_000000.bin")[:2] == [20240801, 7]
    val = open_shard(out / "val_000000.bin", tok.vocab_size)
    assert tok.decode(val.tolist()) == EOT_TOKEN + val_text(shared_data)  # round trip through the 32-bit file
    x, y = ShardLoader(out, "val", 2, 16, shuffle=False).next_batch()
    assert x[0, 0].item() == tok.eot and (x[:, 1:] == y[:, :-1]).all()


def test_trained_tokenizer_shards_record_it_and_stay_llmc_uint16(tmp_path, trained, shared_data):  # noqa: F811
    out = tmp_path / "data"
    argv = ["data", "prepare", "shakespeare", "--tokenizer", str(trained.folder), "--out", str(out), "--workers", "2"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"name": "sh512", "hash": trained.hash, "vocab_size": 512, "eot": trained.eot}
    assert header(out / "train_000000.bin")[:2] == [20240520, 1]  # 16-bit: llm.c's GPT-2 format, readable by llm.c
    assert (out / "tokenizer.json").read_bytes() == (trained.folder / "tokenizer.json").read_bytes()
    val = open_shard(out / "val_000000.bin")
    assert trained.decode(val.tolist()) == EOT_TOKEN + val_text(shared_data)
    assert read_header(out / "val_000000.bin") == len(trained.encode_ordinary(val_text(shared_data))) + 1
    assert main(argv) == 0  # complete: nothing to do
    other = argv[:4] + ["gpt2"] + argv[5:]
    assert main(other) == 2  # the same folder, another tokenizer: refused


@pytest.fixture(scope="module")
def trained_data(tmp_path_factory, trained) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("data") / "sh512"
    prepare(Settings("shakespeare", shard_size=10_000_000), out, workers=1, quiet=True, tokenizer=trained.folder)
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, trained_data) -> Path:
    """A tiny model trained for 2 steps on the trained tokenizer's shards."""
    folder = tmp_path_factory.mktemp("run")
    cfg = write_config(folder, trained_data, train={"max_steps": 2, "save_every": 2}, eval={"val_every": 0})
    assert main(["train", str(cfg), "--run-dir", str(folder / "run")]) == 0
    return folder / "run"


def test_training_takes_the_vocabulary_and_refuses_another_tokenizers_shards(
    trained,  # noqa: F811
    trained_run,
    shakespeare_data,  # noqa: F811
    capsys,
):
    run = trained_run
    latest = ckpt.find_latest(run)
    saved = json.loads((latest / "config.json").read_text())
    assert (saved["model"]["vocab_size"], saved["model"]["padded_vocab_size"]) == (512, 512)  # from the shards
    assert saved["train_state"]["tokenizer"]["hash"] == trained.hash
    assert (run / "tokenizer.json").read_bytes() == (trained.folder / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(["train", str(run / "config.toml"), "--run-dir", str(run)]) == 0  # the adopted vocab is the config
    assert "already trained" in capsys.readouterr().out
    # resuming on GPT-2's shards: refused, naming both tokenizers
    argv = ["train", "--resume", str(run), "--set", f"data.path={shakespeare_data}", "--set", "train.max_steps=4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sh512 (sha256" in err and "gpt2 (sha256" in err and err.count("\n") == 1


def test_sample_eval_and_export_use_the_runs_tokenizer(
    tmp_path,
    trained,  # noqa: F811
    trained_run,
    trained_data,
    shakespeare_data,  # noqa: F811
    capsys,
):
    import math

    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from gpt2lab.inference.generate import TextStream, generate_ids
    from gpt2lab.interop.load import load_model
    from tests.conftest import assert_close_f32

    run, model = trained_run, load_model(str(trained_run))
    capsys.readouterr()
    assert main(["sample", "--model", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--seed", "3"]) == 0
    (ids,) = generate_ids(model, trained.encode("ROMEO:"), max_new_tokens=8, seed=3, eos_id=trained.eot)
    assert capsys.readouterr().out.rstrip("\n") == "ROMEO:" + trained.decode(ids)
    assert main(["sample", "--model", str(run), "--tokenizer", "gpt2"]) == 2  # not the model's tokenizer
    assert "sh512 (sha256" in capsys.readouterr().err

    report = tmp_path / "loss.json"
    assert main(["eval", "loss", "--model", str(run), "--data", str(trained_data), "--json", str(report)]) == 0
    result = json.loads(report.read_text())["loss"]
    loader = ShardLoader(trained_data, "val", 8, model.config.block_size, shuffle=False)
    targets = [loader.next_batch()[1] for _ in range(loader.batches_per_epoch)]
    # Shakespeare is ASCII: a row's bytes are its decoded characters, less "<|endoftext|>"'s
    rows = [row for y in targets for row in y]
    nbytes = sum(len(trained.decode(row.tolist())) - len(EOT_TOKEN) * int((row == trained.eot).sum()) for row in rows)
    assert result["bytes"] == nbytes
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / nbytes, rel=1e-9)
    assert main(["eval", "loss", "--model", str(run), "--data", str(shakespeare_data)]) == 2  # GPT-2's shards
    assert "gpt2 (sha256" in capsys.readouterr().err

    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    text = f"KING RICHARD III: 1234 ‘quoth’ 😀{EOT_TOKEN}next"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == trained.encode(text)
    hf_model = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    assert hf_model.config.eos_token_id == trained.eot
    x = torch.tensor([trained.encode(text)[: model.config.block_size]])
    with torch.no_grad():
        assert_close_f32(hf_model(x).logits, model(x, x)[0])  # (1, T, 512) both
    assert TrainedTokenizer(out).hash == trained.hash  # exported verbatim: sample --model OUT finds it too

    stream = TextStream(trained, trained.eot)  # streaming decode never splits a multi-byte character
    pieces = [stream.push(i) for i in trained.encode("naïve 日本語 😀👩‍👧 fin")] + [stream.flush()]
    assert "".join(pieces) == "naïve 日本語 😀👩‍👧 fin" and not any("\ufffd" in p for p in pieces)
