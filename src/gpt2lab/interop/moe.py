"""Hugging Face Qwen3-MoE and Mixtral folders in and out, for the [model] switches that make those networks.

A Llama-shaped network (RoPE + RMSNorm + SwiGLU + no biases, see ``gpt2lab.interop.llama``) whose MLPs are
mixtures of experts with a softmax router, no shared experts and no routing bias is
- with ``qk_norm``: exactly ``Qwen3MoeForCausalLM`` (dense blocks are its ``mlp_only_layers``,
  ``moe_norm_topk_prob`` its ``norm_topk_prob``);
- without: exactly ``MixtralForCausalLM``, when every block is MoE and the k gate weights are
  renormalised (Mixtral always does both).
Attention, norms and embeddings convert as in ``gpt2lab.interop.llama``. The experts are written one by
one, as transformers' ``save_pretrained`` writes them (``mlp.experts.{e}.gate_proj.weight`` ...;
Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``, w3 = up, w2 = down); import also reads the fused
3-D ``experts.gate_up_proj`` / ``experts.down_proj`` of transformers 5's modules. ``transformers`` itself
is never imported.
"""

from __future__ import annotations

import dataclasses

import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop import llama as hf_llama
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT

FAMILIES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
# an expert's three weights: gpt2lab's slice of the 3-D tensors -> (Qwen3-MoE name, Mixtral name)
EXPERT_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


def problems(config: GPTConfig) -> list[str]:
    """The switches that keep this MoE config from being Qwen3-MoE or Mixtral (empty: it is one)."""
    required = dict(hf_llama.REQUIRED, moe_router="softmax", n_shared_experts=0)
    if len(config.moe_layer_ids) == config.n_layer:  # no dense block: model.mlp is unused
        required.pop("mlp")
    if getattr(config, "attention", "mha") != "mha":
        required["attention"] = "mha"
    out = [f"model.{k}={getattr(config, k)}" for k, v in required.items() if getattr(config, k) != v]
    if not config.qk_norm and len(config.moe_layer_ids) < config.n_layer:
        out.append(f"model.moe_layers={config.moe_layers} without model.qk_norm (Mixtral: every block MoE)")
    if not config.qk_norm and not config.moe_norm_topk_prob:
        out.append("model.moe_norm_topk_prob=false without model.qk_norm (Mixtral renormalises)")
    return out


def family(config: GPTConfig) -> str | None:
    """'qwen3_moe' or 'mixtral' when this config is exactly one of those networks, else None."""
    if not config.n_experts or problems(config):
        return None
    return "qwen3_moe" if config.qk_norm else "mixtral"


def check_exportable(model: GPT) -> None:
    """One error naming each switch (or a trained routing bias) that has no Qwen3-MoE/Mixtral equivalent."""
    found = problems(model.config)
    if any(m.e_score_correction_bias.any() for m in model.moe_layers()):
        found.append(f"a trained routing bias (model.moe_bias_update_rate={model.config.moe_bias_update_rate})")
    if found:
        llama = ", ".join(f"model.{k}={v}" for k, v in hf_llama.REQUIRED.items())
        raise Gpt2LabError(
            f"export: MoE with {', '.join(found)} has no Hugging Face equivalent: {', '.join(FAMILIES.values())} "
            f"take {llama}, model.moe_router=softmax, no shared experts and no routing bias (train with "
            "model.moe_bias_update_rate=0); the checkpoint itself samples, evaluates and trains"
        )


def config_to_hf(config: GPTConfig) -> dict:
    """config.json of the Qwen3-MoE or Mixtral class this config is (vocabulary unpadded)."""
    name = family(config)
    hf = hf_llama.config_to_hf(dataclasses.replace(config, n_experts=0))  # attention, norms, RoPE, embeddings
    moe = {
        "architectures": [FAMILIES[name]],
        "model_type": name,
        "num_experts_per_tok": config.experts_per_token,
        "router_aux_loss_coef": config.moe_aux_loss_coef,
        "output_router_logits": False,
    }
    if name == "mixtral":
        drop = ("mlp_bias", "attention_bias", "use_sliding_window")
        return {k: v for k, v in hf.items() if k not in drop} | moe | {
            "num_local_experts": config.n_experts, "intermediate_size": config.expert_hidden,
            "sliding_window": None, "router_jitter_noise": 0.0,
        }  # fmt: skip
    dense = [i for i in range(config.n_layer) if i not in config.moe_layer_ids]
    return hf | moe | {
        "num_experts": config.n_experts, "moe_intermediate_size": config.expert_hidden,
        "norm_topk_prob": config.moe_norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": dense,
    }  # fmt: skip


def config_from_hf(hf: dict, source) -> GPTConfig:
    """A GPTConfig from a Qwen3-MoE or Mixtral config.json; options gpt2lab does not build are an error."""
    name = hf["model_type"]
    try:
        n_experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
        k, layers = hf["num_experts_per_tok"], hf["num_hidden_layers"]
        if name == "mixtral":
            if hf.get("sliding_window"):
                raise Gpt2LabError(f"mixtral with sliding_window={hf['sliding_window']} is not supported")
            moe = dict(moe_hidden=hf["intermediate_size"], moe_layers="all", moe_norm_topk_prob=True)
        else:
            step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
            ids = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
            if not ids:
                raise Gpt2LabError("qwen3_moe without MoE layers: load it as a qwen3 folder")
            moe_layers = "all" if len(ids) == layers else ",".join(map(str, ids))
            moe = dict(moe_hidden=hf["moe_intermediate_size"], moe_layers=moe_layers,
                       moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)))  # fmt: skip
    except KeyError as e:
        raise Gpt2LabError(f"{source}: missing key {e}") from None
    except Gpt2LabError as e:
        raise Gpt2LabError(f"{source}: {e}") from None
    base = hf_llama.config_from_hf({**hf, "model_type": "qwen3" if name == "qwen3_moe" else "llama"}, source)
    aux = hf.get("router_aux_loss_coef", 0.0) if hf.get("output_router_logits") else 0.0
    return dataclasses.replace(
        base, n_experts=n_experts, experts_per_token=k, moe_router="softmax", n_shared_experts=0,
        moe_bias_update_rate=0.0, moe_aux_loss_coef=aux, **moe,
    )  # fmt: skip


def _prefix(name: str, layer: int) -> str:
    return f"model.layers.{layer}.{'block_sparse_moe' if name == 'mixtral' else 'mlp'}."


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under Qwen3-MoE/Mixtral names, one tensor per expert weight, as save_pretrained writes."""
    config, name = model.config, family(model.config)
    out = hf_llama.to_hf_state_dict(model)  # all but the experts and routers
    column = 0 if name == "qwen3_moe" else 1
    for i in config.moe_layer_ids:
        moe, theirs = model.transformer.h[i].mlp, _prefix(name, i)
        out[theirs + "gate.weight"] = moe.gate.weight.detach().cpu().contiguous()
        gate_up, down = moe.experts.gate_up_proj.detach().cpu(), moe.experts.down_proj.detach().cpu()
        gate, up = gate_up.chunk(2, dim=1)  # (E, H, C) each
        for e in range(config.n_experts):
            for ours, w in (("gate", gate[e]), ("up", up[e]), ("down", down[e])):
                out[f"{theirs}experts.{e}.{EXPERT_NAMES[ours][column]}.weight"] = w.contiguous()
    return out


def _experts(state: dict[str, torch.Tensor], theirs: str, n_experts: int) -> tuple:
    """(gate_up_proj, down_proj) 3-D from fused or per-expert tensors under `theirs` ('model.layers.3.mlp.')."""
    if theirs + "experts.gate_up_proj" in state:  # transformers 5's in-memory layout
        return state[theirs + "experts.gate_up_proj"], state.get(theirs + "experts.down_proj")
    try:
        gate, up, down = (torch.stack([_expert(state, f"{theirs}experts.{e}.", names) for e in range(n_experts)])
                          for names in EXPERT_NAMES.values())  # fmt: skip
    except KeyError:
        return None, None  # named by check_and_load as missing
    return torch.cat([gate, up], dim=1), down  # (E, 2H, C), (E, C, H)


def _expert(state: dict[str, torch.Tensor], prefix: str, names: tuple[str, str]) -> torch.Tensor:
    """One expert weight under its Qwen3-MoE name or its Mixtral one."""
    for name in names:
        if f"{prefix}{name}.weight" in state:
            return state[f"{prefix}{name}.weight"]
    raise KeyError(prefix + names[0])


def from_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Qwen3-MoE/Mixtral weights under gpt2lab's names (experts stacked into 3-D); shapes checked by the caller."""
    state = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in state.items()}  # Mixtral's files
    out = hf_llama.from_hf_state_dict(state, config)
    for i in config.moe_layer_ids:
        ours, theirs = f"transformer.h.{i}.mlp.", f"model.layers.{i}.mlp."
        gate_up, down = _experts(state, theirs, config.n_experts)
        out |= {
            ours + "gate.weight": state.get(theirs + "gate.weight"),
            ours + "experts.gate_up_proj": gate_up,
            ours + "experts.down_proj": down,
            ours + "e_score_correction_bias": torch.zeros(config.n_experts),
        }  # no routing bias in these families
    return {k: v for k, v in out.items() if v is not None}
