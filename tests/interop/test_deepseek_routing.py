"""DeepSeek-V3 folders with the published routing (routed_scaling_factor, n_group, topk_group): read by gpt2lab,
written back by `gpt2lab export`, each checked against transformers' DeepseekV3ForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gpt2lab.checkpoint.folder import save_model
from gpt2lab.cli.main import main
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop.hf import config_from_hf, export_hf
from gpt2lab.interop.load import load_model
from tests.conftest import assert_close_f32, assert_not_close_f32, tiny_deepseek_v3

transformers = pytest.importorskip("transformers")


def _deepseek_v3(**routing) -> transformers.DeepseekV3ForCausalLM:
    """A tiny DeepseekV3ForCausalLM, MoE in blocks 1 and 2, sharp routers and a random routing bias."""
    return tiny_deepseek_v3(3, **routing)


ROUTING = dict(routed_scaling_factor=2.5, n_group=4, topk_group=2)


def test_a_deepseek_v3_folder_with_group_limited_scaled_routing_loads_and_exports_back(tmp_path, capsys):
    theirs = _deepseek_v3(**ROUTING)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(str(tmp_path / "hf"))  # was refused: "routed_scaling_factor=2.5 is not supported"
    cfg = ours.config
    assert (cfg.moe_routed_scaling_factor, cfg.moe_n_group, cfg.moe_topk_group) == (2.5, 4, 2)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = theirs(idx).logits
        assert_close_f32(ours(idx)[0], expected)
        plain = _deepseek_v3(routed_scaling_factor=1.0, n_group=1, topk_group=1)  # same weights, plain routing
        assert_not_close_f32(plain(idx).logits, expected)  # the routing options change this model's logits

    save_model(ours, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: written[k] for k in ROUTING} == ROUTING
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (back.config.routed_scaling_factor, back.config.n_group, back.config.topk_group) == (2.5, 4, 2)
    with torch.no_grad():
        assert_close_f32(back(idx).logits, expected)


def test_a_bf16_export_writes_the_routing_bias_in_float32(tmp_path):
    """transformers keeps e_score_correction_bias float32 (_keep_in_fp32_modules_strict): so does gpt2lab."""
    theirs = _deepseek_v3(**ROUTING)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(str(tmp_path / "hf"), dtype="bfloat16")
    bias = theirs.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(ours.transformer.h[1].mlp.e_score_correction_bias, bias)  # not rounded to bf16
    export_hf(ours, tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        written = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    assert written.dtype == torch.float32 and torch.equal(written, bias)


def test_published_defaults_are_read_and_impossible_groupings_refused():
    """config.json without the routing keys means DeepseekV3Config's defaults: 8 groups, 4 kept, factor 2.5."""
    hf = _deepseek_v3(**ROUTING).config.to_dict()
    for key in ROUTING:
        del hf[key]
    cfg = config_from_hf(hf | {"n_routed_experts": 16})
    assert (cfg.moe_n_group, cfg.moe_topk_group, cfg.moe_routed_scaling_factor, cfg.n_experts) == (8, 4, 2.5, 16)
    with pytest.raises(Gpt2LabError, match="model.moe_n_group"):  # 8 experts in 8 groups: one per group
        config_from_hf(hf, "x/config.json")
    with pytest.raises(Gpt2LabError, match="x/config.json: model.moe_topk_group"):
        config_from_hf(hf | {"n_group": 4, "topk_group": 5}, "x/config.json")
