"""SFT, chat and export of a model trained with its own tokenizer (`gpt2lab tokenizer train`): every step uses
that tokenizer's ids, and a base model of another vocabulary is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpt2lab.chat.base import CHAT_VOCAB_SIZE, load_base_weights
from gpt2lab.chat.template import render, render_prompt
from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, find_latest, save_model
from gpt2lab.cli.main import main
from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.generate import generate_ids
from gpt2lab.interop.load import load_model
from gpt2lab.interop.tokenizer_match import checkpoint_record, model_tokenizer, record_of
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import SPECIAL_TOKENS, TOKENIZER_JSON, TOKENIZER_META, TrainedTokenizer
from gpt2lab.tokenizer.train import BpeConfig, documents, train_bpe
from tests.chat.test_export import CONVERSATIONS, _ids
from tests.chat.test_terminal import _chat, _greedy
from tests.conftest import assert_close_f32

VOCAB = 512


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TrainedTokenizer:
    """A 512-token tokenizer trained on 50K characters of Tiny Shakespeare (under a second)."""
    out = tmp_path_factory.mktemp("tok") / "sh512"
    train_bpe(documents(["shakespeare"], held_out=False), BpeConfig(VOCAB, "gpt4", max_chars=50_000), out)
    return TrainedTokenizer(out)


def _base(folder, vocab: int, tok: TrainedTokenizer | None = None):
    """A tiny base model saved as a pretraining run saves it: its tokenizer recorded and copied beside it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))
    state = {"tokenizer": record_of(tok)} if tok is not None else {}
    save_model(model, folder, extra={TRAIN_STATE_KEY: state})
    for name in (TOKENIZER_JSON, TOKENIZER_META) if tok is not None else ():
        shutil.copyfile(tok.folder / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tok):
    """`gpt2lab sft` for a few steps on a base model trained with ``tok``."""
    folder = tmp_path_factory.mktemp("sft")
    base = _base(folder / "base", VOCAB, tok)
    words = "the king my lord good sweet love night death heaven".split()
    records = [
        {"messages": [{"role": "user", "content": f"{a} {b}?"}, {"role": "assistant", "content": f"{b} {a}."}]}
        for a in words
        for b in words
    ]
    (folder / "d.jsonl").write_text("\n".join(map(json.dumps, records)))
    argv = ["sft", "--model", str(base), "--data", str(folder / "d.jsonl"), "--run-dir", str(folder / "run")]
    # sft.packing=cross: the 40 steps as they were measured when the merged-token check below was written (what so
    # few steps teach is chance: under the default mask this prompt's greedy reply holds single bytes only)
    for setting in ("train.max_steps=40 train.micro_batch=4 sft.lr=1e-2 train.save_every=0 eval.val_every=40 "
                    "log.tensorboard=false train.device=cpu sft.packing=cross").split():  # fmt: skip
        argv += ["--set", setting]
    assert main(argv) == 0
    return folder / "run"


def test_sft_on_a_trained_tokenizer_base_keeps_its_vocabulary_and_tokenizer(sft_run, tok):
    assert (sft_run / TOKENIZER_JSON).read_bytes() == (tok.folder / TOKENIZER_JSON).read_bytes()
    assert checkpoint_record(find_latest(sft_run))["hash"] == tok.hash
    assert model_tokenizer(str(sft_run)).hash == tok.hash
    assert load_model(str(sft_run)).config.vocab_size == VOCAB  # the special tokens are in it already
    metrics = [json.loads(line) for line in (sft_run / "metrics.jsonl").open()]
    assert any("val_loss" in r for r in metrics)


def test_chat_through_a_pipe_speaks_with_the_trained_tokenizer(sft_run, tok):
    done = _chat(sft_run, "good night\n/quit\n", "--temperature", "0", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    model, messages = load_model(str(sft_run)), [{"role": "user", "content": "good night"}]
    assert done.stdout == f"{_greedy(model, tok, messages, 8)}\n"
    # the reply holds merged tokens (ids 256+, below the special tokens), whose text only this tokenizer gives
    ids = generate_ids(model, render_prompt(messages, tok), max_new_tokens=8, temperature=0, eos_id=None)[0]
    assert any(256 <= i < tok.eot for i in ids), ids
    assert "base model" not in done.stderr


def test_export_writes_the_chat_template_at_the_trained_tokenizers_ids(sft_run, tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", str(sft_run), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for conv in CONVERSATIONS:
        assert _ids(hf.apply_chat_template(conv, add_generation_prompt=True)) == render_prompt(conv, tok)
        assert _ids(hf.apply_chat_template(conv)) == render(conv, tok)[0]
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eot, tok.special_id("<|assistant_end|>")]
    assert max(render_prompt(CONVERSATIONS[1], tok)) < VOCAB


def test_a_base_model_of_another_vocabulary_is_refused(tmp_path, tok):
    gpt2_base = _base(tmp_path / "gpt2", 50257)
    trained_base = _base(tmp_path / "trained", VOCAB, tok)
    for base, sft_vocab in ((gpt2_base, VOCAB), (trained_base, CHAT_VOCAB_SIZE)):
        model = GPT(GPTConfig(block_size=32, vocab_size=sft_vocab, n_layer=2, n_head=2, n_embd=32))
        with pytest.raises(Gpt2LabError, match=f"does not match the SFT model's vocab_size {sft_vocab:,}"):
            load_base_weights(model, str(base))


def test_the_chat_tokens_rows_start_at_the_mean_of_the_pretrained_ones(tmp_path, tok):
    """A trained tokenizer's chat tokens were never in the pretraining text: like GPT-2's new rows, they start at
    the mean embedding; every other row (<|endoftext|> included) is the base's."""
    base = _base(tmp_path / "base", VOCAB, tok)
    model = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    load_base_weights(model, str(base))
    wte, base_wte = model.transformer.wte.weight, load_model(str(base)).transformer.wte.weight
    chat = [tok.special_id(t) for t in SPECIAL_TOKENS]
    kept = [i for i in range(VOCAB) if i not in chat]
    assert torch.equal(wte[kept], base_wte[kept])
    for i in chat:
        assert_close_f32(wte[i], base_wte[kept].mean(0))
