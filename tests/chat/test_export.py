"""`gpt2lab export` of a chat model: transformers' apply_chat_template gives exactly gpt2lab's ids."""

from __future__ import annotations

import ast
import json
import shlex
import subprocess
import sys

import pytest
import torch

from gpt2lab.chat.base import CHAT_VOCAB_SIZE
from gpt2lab.chat.template import render, render_prompt
from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, save_model
from gpt2lab.cli.main import main
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import get_tokenizer
from tests.test_readme import readme_commands

transformers = pytest.importorskip("transformers")

# Contents never hold a special token's exact string: transformers' tokenizer splits text at added tokens before
# BPE, so there "<|endoftext|>" in a message becomes the token, while gpt2lab keeps it text (no role injection).
CONVERSATIONS = [
    [{"role": "user", "content": "What is 17+25?"}],
    [{"role": "system", "content": "You are Ada, a terse assistant."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "naïve café — 日本語 😀\n\n  spaces  "},
        {"role": "assistant", "content": " 42\n"},
        {"role": "user", "content": "and <| reversed |>?"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "?"}, {"role": "user", "content": "x"}],
    [  # a thinking span (issue 14): reasoning_content rendered as <think>...</think> before the answer
        {"role": "user", "content": "What is 17+25?"},
        {"role": "assistant", "reasoning_content": "7+5=12, carry 1; 1+2+1=4", "content": "42"},
        {"role": "user", "content": "And 1+1?"},
    ],
]


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=CHAT_VOCAB_SIZE, padded_vocab_size=50304, n_layer=1, n_head=2,
                          n_embd=32))  # fmt: skip
    save_model(model, folder / "chat", extra={TRAIN_STATE_KEY: {"config": {"sft": {"data": "x.jsonl"}}}})
    assert main(["export", str(folder / "chat"), str(folder / "hf")]) == 0
    return folder / "hf"


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_apply_chat_template_gives_gpt2labs_ids(exported, conv):
    tok = get_tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    assert _ids(hf.apply_chat_template(conv, add_generation_prompt=True)) == render_prompt(conv, tok)
    assert _ids(hf.apply_chat_template(conv)) == render(conv, tok)[0]
    ids = render_prompt(conv, tok)
    assert hf.decode(ids) == tok.decode(ids)


def test_the_exported_model_stops_at_the_assistants_end(exported):
    generation = json.loads((exported / "generation_config.json").read_text())
    end = get_tokenizer().special_id("<|assistant_end|>")
    assert generation["eos_token_id"] == [50256, end]
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.vocab_size == CHAT_VOCAB_SIZE
    with torch.no_grad():  # make <|assistant_end|> the likeliest token everywhere: generate must stop after it
        model.lm_head.weight[end] = model.lm_head.weight[:50257].mean(0) + 5 * model.lm_head.weight.std()
        model.transformer.ln_f.bias.copy_(model.lm_head.weight[end] * 10)
    prompt = torch.tensor([render_prompt(CONVERSATIONS[0], get_tokenizer())])
    out = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert out[0, -1].item() == end and out.size(1) < prompt.size(1) + 10


def test_a_base_model_exports_without_the_chat_files(tmp_path):
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    save_model(model, tmp_path / "base")
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "hf")]) == 0
    assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    # a base model stops at <|endoftext|> alone (issue 26: every export has its generation_config.json)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 50256


def test_the_readmes_chat_template_one_liner_prints_gpt2labs_ids(exported):
    """The README's `apply_chat_template` one-liner, run as written on an exported folder, prints a list of ids
    (transformers 5 returns a dict unless told `return_dict=False`)."""
    line = next(c for c in readme_commands() if "apply_chat_template" in c)
    code = shlex.split(line)[2].replace("'runs/chat-hf'", repr(str(exported)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    printed = ast.literal_eval(out.stdout.strip())
    assert printed == render_prompt([{"role": "user", "content": "hi"}], get_tokenizer())
