"""`gpt2lab sft` through the one training loop: a tiny model learns to answer held-out prompts in the chat path."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

from gpt2lab.chat.base import CHAT_VOCAB_SIZE, chat_model_config, is_chat_model, load_base_weights
from gpt2lab.chat.terminal import Chat, Sampling
from gpt2lab.checkpoint.folder import save_model
from gpt2lab.cli.main import main
from gpt2lab.interop.load import load_model
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import get_tokenizer


def synthetic(tok, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) (prompt, answer) pairs: is this a question (yes/no), and what is your name.

    The held-out questions are made of words never seen in training, so only the skill (look at the last mark
    of the message) can answer them. Measured on this CPU, a color-recall task ("The cup is red. What color is
    the cup?") stayed near chance after 200 steps at this size, so it is not part of the proof.
    """
    rng = random.Random(seed)
    pieces = (tok.decode([i]) for i in range(300, 12000))  # one-token words with a leading space
    words = sorted({w[1:] for w in pieces if w.startswith(" ") and w[1:].isalpha() and w[1:].islower() and len(w) >= 5})
    rng.shuffle(words)

    def make(vocab, n):
        out = []
        for _ in range(n):
            question = rng.random() < 0.5
            text = " ".join(rng.sample(vocab, rng.randint(3, 6)))
            out.append((text + ("?" if question else "."), "yes" if question else "no"))
        return out

    name = ("What is your name?", "Ada")
    return make(words[:300], 400) + [name] * 40, make(words[300:400], 40) + [name]


def accuracy(model: GPT, tok, pairs) -> float:
    """Exact answers through the terminal chat's path (template, generate, stop at <|assistant_end|>), greedy."""
    chat = Chat(model.eval(), tok, sampling=Sampling(max_new_tokens=4, temperature=0))
    right = 0
    for prompt, answer in pairs:
        chat.reset()
        right += chat.say(prompt, io.StringIO()) == answer
    return right / len(pairs)


def test_sft_teaches_a_tiny_model_to_answer_held_out_prompts(tmp_path):
    tok = get_tokenizer()
    train, held_out = synthetic(tok)
    data = tmp_path / "train.jsonl"
    messages = ({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in train)
    data.write_text("\n".join(map(json.dumps, messages)))
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=2, n_head=2, n_embd=64))  # no spare rows
    save_model(base, tmp_path / "base")
    start = GPT(chat_model_config(base.config))
    load_base_weights(start, str(tmp_path / "base"))
    assert start.config.vocab_size == CHAT_VOCAB_SIZE and start.config.embedding_rows == 50304
    before = accuracy(start, tok, held_out)
    assert before < 0.1, before
    argv = ["sft", "--model", str(tmp_path / "base"), "--data", str(data), "--run-dir", str(tmp_path / "run")]
    settings = "train.max_steps=120 train.micro_batch=8 sft.lr=1e-2 sft.warmup_fraction=0.05 eval.val_every=120"
    for setting in (settings + " train.save_every=0 log.tensorboard=false train.device=cpu").split():
        argv += ["--set", setting]
    assert main(argv) == 0
    assert is_chat_model(str(tmp_path / "run")) and not is_chat_model(str(tmp_path / "base"))
    after = accuracy(load_model(str(tmp_path / "run")), tok, held_out)
    print(f"held-out exact answers: {before:.0%} before SFT, {after:.0%} after")
    assert after >= 0.9, after
    vals = [r["val_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] / 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "x.jsonl"], "needs --model"),
        (["--model", "BASE"], "needs --model (the model to fine-tune) and --data"),
        (["--model", "BASE", "--data", "x.jsonl", "--set", "sft.overlong=cut"], "sft.overlong must be truncate or"),
        (["--model", "BASE", "--data", "x.jsonl:-1"], "weight of x.jsonl must be > 0"),
        (["--model", "BASE", "--data", "missing.jsonl", "--set", "train.max_steps=1"], "missing.jsonl: SFT data file"),
        (["CONFIG", "--model", "BASE", "--data", "x.jsonl"], "an SFT run takes its [model]"),
        (["--model", "BASE", "--data", "x.jsonl", "--set", "sft.packing=stack"], "sft.packing must be one of mask,"),
        (["--model", "BASE", "--data", "x.jsonl", "--set", "perf.attn_backend=flash"], "attn_backend = flash does"),
    ],
)
def test_bad_sft_settings_are_one_clear_error_before_any_work(tmp_path, capsys, argv, message):
    save_model(GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)), tmp_path / "base")
    (tmp_path / "c.toml").write_text("[model]\nn_layer = 2\n")
    argv = [str(tmp_path / "base") if a == "BASE" else str(tmp_path / "c.toml") if a == "CONFIG" else a for a in argv]
    assert main(["sft", *argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ddp_sft_matches_one_process_accumulating_the_same_rows(tmp_path):
    """2 gloo ranks x micro-batch 2 == 1 process with 2 micro-batches of 2: the loss is over the global batch's
    trained tokens (micro-batches hold different numbers of them), so the weights agree after 3 steps."""
    import os
    import subprocess
    import sys

    from gpt2lab.checkpoint import folder as ckpt
    from tests.conftest import REPO, assert_close_f32

    rng = random.Random(1)
    answers = ["ok " * rng.randint(1, 9) for _ in range(40)]  # micro-batches with few and many trained tokens
    user = [{"role": "user", "content": f"q {i}"} for i in range(40)]
    records = [{"messages": [u, {"role": "assistant", "content": a}]} for u, a in zip(user, answers)]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, records)))
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), tmp_path / "base")
    args = ["sft", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "d.jsonl")]
    for s in "train.max_steps=3 train.micro_batch=2 train.total_batch=128 sft.lr=1e-2 train.save_every=0".split():
        args += ["--set", s]
    args += ["--set", "log.tensorboard=false", "--set", "eval.val_every=3", "--set", "train.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2lab", *args,
         "--run-dir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stdout[-1500:] + ddp.stderr[-3000:]  # how far each rank got, and why it stopped
    assert "2 x cpu, grad accumulation 1" in ddp.stdout
    assert main([*args, "--run-dir", str(tmp_path / "one")]) == 0
    one, two = ckpt.find_latest(tmp_path / "one"), ckpt.find_latest(tmp_path / "ddp")
    w1, w2 = (ckpt.load_state_dict(p / ckpt.WEIGHTS_NAME) for p in (one, two))
    for name, w in w1.items():
        assert_close_f32(w2[name], w, msg=name)


def test_an_sft_run_resumes_exactly_with_gpt2lab_train_resume_without_its_base_model(tmp_path):
    import shutil

    from gpt2lab.checkpoint import folder as ckpt

    records = [{"question": f"what is {i} + 1?", "answer": f"{i + 1}"} for i in range(30)]  # the GSM8K layout
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, records)))
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), tmp_path / "base")
    args = ["sft", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "d.jsonl")]
    args += ["--run-dir", str(tmp_path / "a")]
    for s in "train.max_steps=4 train.micro_batch=2 train.save_every=2 train.keep_checkpoints=0 sft.lr=1e-2".split():
        args += ["--set", s]
    assert main([*args, "--set", "log.tensorboard=false", "--set", "eval.val_every=0"]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000004")
    shutil.rmtree(tmp_path / "base")  # the run's checkpoint holds every weight: a resume never reads the base
    assert main(["train", "--resume", str(tmp_path / "b")]) == 0
    last = [p / "checkpoints" / "step_0000004" / ckpt.WEIGHTS_NAME for p in (tmp_path / "a", tmp_path / "b")]
    w_a, w_b = map(ckpt.load_state_dict, last)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_an_sft_run_on_a_trained_tokenizer_resumes_without_its_base_or_tokenizer_folder(tmp_path):
    """The run's checkpoint records its tokenizer and the run folder holds a copy: neither base nor tok/ is read."""
    import shutil

    from gpt2lab.checkpoint import folder as ckpt
    from gpt2lab.tokenizer.bpe import TrainedTokenizer
    from gpt2lab.tokenizer.train import BpeConfig, documents, train_bpe
    from tests.chat.test_trained_tokenizer import _base

    train_bpe(documents(["shakespeare"], held_out=False), BpeConfig(512, "gpt4", max_chars=20_000), tmp_path / "tok")
    base = _base(tmp_path / "base", 512, TrainedTokenizer(tmp_path / "tok"))
    records = [{"messages": [{"role": "user", "content": f"my lord {i}?"}, {"role": "assistant", "content": "good"}]}
               for i in range(20)]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, records)))
    args = ["sft", "--model", str(base), "--data", str(tmp_path / "d.jsonl"), "--run-dir", str(tmp_path / "a")]
    for s in "train.max_steps=4 train.micro_batch=2 train.save_every=2 train.keep_checkpoints=0 sft.lr=1e-2".split():
        args += ["--set", s]
    assert main([*args, "--set", "log.tensorboard=false", "--set", "eval.val_every=2"]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000004")
    shutil.rmtree(tmp_path / "base"), shutil.rmtree(tmp_path / "tok")
    assert main(["train", "--resume", str(tmp_path / "b")]) == 0
    last = [p / "checkpoints" / "step_0000004" for p in (tmp_path / "a", tmp_path / "b")]
    w_a, w_b = (ckpt.load_state_dict(p / ckpt.WEIGHTS_NAME) for p in last)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    records = [ckpt.read_json(p / ckpt.CONFIG_NAME)[ckpt.TRAIN_STATE_KEY]["tokenizer"] for p in last]
    assert records[0] == records[1] and records[0]["vocab_size"] == 512  # the resumed run records the same one


def test_an_optim_key_the_sft_schedule_replaces_is_refused_naming_the_sft_key(tmp_path, capsys):
    """[sft]'s lr, warmup and floor replace [optim]'s: a user's optim.lr would train at sft.lr's 2e-5 unsaid."""
    import argparse

    from gpt2lab.sft.command import sft_config

    base = save_model(GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)), tmp_path / "base")
    argv = ["sft", "--model", str(base), "--data", "x.jsonl", "--run-dir", str(tmp_path / "run")]
    capsys.readouterr()
    assert main([*argv, "--set", "optim.lr=3e-3"]) == 2
    assert capsys.readouterr().err == "error: optim.lr is set by sft.lr in gpt2lab sft: use --set sft.lr=3e-3\n"
    (tmp_path / "c.toml").write_text("[optim]\nwarmup_steps = 10\nbeta2 = 0.99\n")
    assert main([*argv, str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'c.toml'}: optim.warmup_steps is set by sft.warmup_fraction")
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()
    # what the stage does not replace is honoured, and sft.lr is the way to the lr
    (tmp_path / "c.toml").write_text("[optim]\nbeta2 = 0.99\n")
    args = argparse.Namespace(config=str(tmp_path / "c.toml"), model=str(base), data=["x.jsonl"], thinking=False,
                              set=["sft.lr=3e-3", "optim.grad_clip=0.5"])  # fmt: skip
    cfg = sft_config(args)
    assert (cfg.optim.lr, cfg.optim.beta2, cfg.optim.grad_clip) == (3e-3, 0.99, 0.5)
