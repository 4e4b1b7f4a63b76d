"""sft.calculator = "tool": GSM8K's annotations (and arith --tool's) trained as calculator calls, their outputs not."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gpt2lab.checkpoint.folder import save_model
from gpt2lab.config import Config
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.rl.gsm8k import load_gsm8k
from gpt2lab.sft.data import SFTConfig, pack, read_conversations, sft_loaders
from gpt2lab.tokenizer.bpe import get_tokenizer
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_the_tool_setting_is_accepted_and_a_bad_one_named():
    assert not [p for p in SFTConfig(calculator="tool").validate() if "calculator" in p]
    assert any("sft.calculator must be one of strip, keep, tool" in p for p in SFTConfig(calculator="x").validate())


def test_a_gsm8k_record_trains_its_calls_but_not_their_outputs(tok):
    record = load_gsm8k("train")[0]  # Natalia: <<48/2=24>> and <<48+24=72>>
    kept = read_conversations(SHARED_DATA / "gsm8k" / "train.jsonl", calculator="keep")[0]
    tool = read_conversations(SHARED_DATA / "gsm8k" / "train.jsonl", calculator="tool")[0]
    assert tool == kept and tool[1]["content"] == record["answer"]  # the text keeps them: rendering makes calls
    packed = pack([tool], tok, block_size=256, tools=True)
    ids, trained = packed.tokens[0].tolist(), packed.trained[0].tolist()
    start, end = tok.special_id("<|tool_start|>"), tok.special_id("<|tool_end|>")
    out_start, out_end = tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")
    assert ids.count(start) == ids.count(end) == ids.count(out_start) == ids.count(out_end) == 2
    assert all(trained[i] for i, t in enumerate(ids) if t in (start, end))
    assert not any(trained[i] for i, t in enumerate(ids) if t in (out_start, out_end))
    outputs = [ids[i + 1 : ids.index(out_end, i)] for i, t in enumerate(ids) if t == out_start]
    assert outputs == [tok.encode_ordinary("24"), tok.encode_ordinary("72")]
    # trained: the answer's text around the calls, each call's <|tool_start|> expr <|tool_end|>, <|assistant_end|>
    plain = sum(len(tok.encode_ordinary(p)) for p in re.split(r"<<[^<>]*>>", record["answer"]))
    calls = len(tok.encode_ordinary("48/2")) + len(tok.encode_ordinary("48+24")) + 2 * 2
    assert sum(trained) == plain + calls + 1
    # with "keep" the same text is trained whole as plain text, the <<...>> included
    keep = pack([kept], tok, block_size=256)
    assert keep.trained.sum() == len(tok.encode_ordinary(record["answer"])) + 1


def test_sft_loaders_render_calls_when_the_setting_is_tool(tmp_path, tok):
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)), tmp_path / "base")
    data = tmp_path / "arith.jsonl"
    reply = {"role": "assistant", "content": "<<47+29=76>>76"}
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 47 + 29?"}, reply]}) + "\n")
    trained_tool_tokens = {}
    for calculator in ("keep", "tool"):
        cfg = Config()
        cfg.model.block_size, cfg.eval.val_every = 64, 0
        cfg.sft.model, cfg.sft.data, cfg.sft.val_fraction = str(tmp_path / "base"), str(data), 0.0
        cfg.sft.calculator = calculator
        loader, _ = sft_loaders(cfg, batch_size=1, rank=0, world_size=1, device="cpu")
        x, y, *_ = loader.next_batch()
        trained_tool_tokens[calculator] = int((y == tok.special_id("<|tool_start|>")).sum())
        assert int((y == tok.special_id("<|output_start|>")).sum()) == 0
        assert int((x == tok.special_id("<|output_start|>")).sum()) == (calculator == "tool")
    assert trained_tool_tokens == {"keep": 0, "tool": 1}
