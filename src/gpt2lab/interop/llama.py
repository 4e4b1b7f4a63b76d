"""Hugging Face Llama and Qwen3 folders in and out, for the [model] switches that make those networks.

RoPE + RMSNorm + SwiGLU + no biases (with any number of key/value heads, tied or untied head) is
exactly ``LlamaForCausalLM``; the same with ``qk_norm`` is exactly ``Qwen3ForCausalLM``. The weights
are renamed, gpt2lab's fused ``c_attn`` (q, k, v) is split into ``q_proj``, ``k_proj``, ``v_proj`` and
back, and padded vocabulary rows are dropped on export. ``transformers`` itself is never imported.
"""

from __future__ import annotations

import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.model.config import GPTConfig

FAMILIES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# what the network must be for either family (qk_norm then picks Qwen3 over Llama)
REQUIRED = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "logit_softcap": 0.0,
            "x0_skip": False, "value_embeddings": False}  # fmt: skip

# per layer: Hugging Face name -> gpt2lab name (q, k and v are slices of attn.c_attn.weight)
LAYER_NAMES = {
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.c_gate.weight",
    "mlp.up_proj.weight": "mlp.c_fc.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
}
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def family(config: GPTConfig) -> str | None:
    """'llama' or 'qwen3' when this config is exactly one of those networks, else None."""
    if config.attention != "mha" or any(getattr(config, k) != v for k, v in REQUIRED.items()):
        return None  # (MLA: DeepSeek-V3, gpt2lab.interop.deepseek)
    if config.n_experts:
        return None  # (MoE: Qwen3-MoE, Mixtral, gpt2lab.interop.moe)
    return "qwen3" if config.qk_norm else "llama"


def config_to_hf(config: GPTConfig) -> dict:
    """config.json of the Llama or Qwen3 class this config is (vocabulary unpadded)."""
    name = family(config)
    hf = {
        "architectures": [FAMILIES[name]],
        "model_type": name,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
    } | shared_fields(config, rope_parameters(config))
    return hf | ({"mlp_bias": False} if name == "llama" else {"use_sliding_window": False})


def shared_fields(config: GPTConfig, rope: dict) -> dict:
    """The config.json keys Llama, Qwen3 and DeepSeek-V3 share: sizes, RMSNorm, RoPE (``rope``: the family's
    rope_parameters), SiLU, embeddings."""
    hf = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_theta": config.rope_theta,  # transformers < 5 reads this key (and rope_scaling), 5 reads rope_parameters
        "rope_parameters": rope,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if config.rope_scaling != "none":
        hf["rope_scaling"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
    return hf


def rope_parameters(config: GPTConfig) -> dict:
    """transformers' rope_parameters for this config's RoPE (default, linear or YaRN)."""
    params = {"rope_type": "default" if config.rope_scaling == "none" else config.rope_scaling}
    if config.rope_scaling != "none":
        params["factor"] = config.rope_factor
    if config.rope_scaling == "yarn":
        params["original_max_position_embeddings"] = config.rope_original_context or config.block_size
    return params | {"rope_theta": config.rope_theta}


def _rope(hf: dict) -> dict:
    """gpt2lab's RoPE fields from a config.json (rope_parameters, or the older rope_theta + rope_scaling)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "yarn"):
        raise Gpt2LabError(f"rope scaling {kind!r} is not supported (gpt2lab has default, linear and yarn)")
    fields = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind != "default":
        fields |= {"rope_scaling": kind, "rope_factor": float(params["factor"])}
    if kind == "yarn":
        fields["rope_original_context"] = int(params["original_max_position_embeddings"])
    return fields


def config_from_hf(hf: dict, source) -> GPTConfig:
    """A GPTConfig from a Llama or Qwen3 config.json; options gpt2lab does not build are an error."""
    name = hf["model_type"]
    unsupported = [k for k in ("attention_bias", "mlp_bias", "use_sliding_window") if hf.get(k)]
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']}")
    try:
        heads, width = hf["num_attention_heads"], hf["hidden_size"]
    except KeyError as e:
        raise Gpt2LabError(f"{source}: missing key {e}") from None
    if hf.get("head_dim") not in (None, width // heads):
        unsupported.append(f"head_dim={hf['head_dim']} (gpt2lab uses hidden_size / num_attention_heads)")
    if unsupported:
        raise Gpt2LabError(f"{source}: {name} with {', '.join(map(str, unsupported))} is not supported")
    try:
        return GPTConfig(
            block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
            n_head=heads, n_embd=width, n_kv_head=hf.get("num_key_value_heads", heads),
            mlp_hidden=hf["intermediate_size"], layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope(hf),
            qk_norm=name == "qwen3", **REQUIRED,
        )  # fmt: skip
    except (KeyError, Gpt2LabError) as e:
        raise Gpt2LabError(f"{source}: {e if isinstance(e, Gpt2LabError) else f'missing key {e}'}") from None


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under Llama/Qwen3 names, vocabulary unpadded (the tied head left to transformers)."""
    cfg, V = model.config, model.config.vocab_size
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    out = {
        "model.embed_tokens.weight": state["transformer.wte.weight"][:V],
        "model.norm.weight": state["transformer.ln_f.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][:V]
    kv = cfg.kv_heads * cfg.head_size
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.c_attn.weight"].split([cfg.n_embd, kv, kv])
        out |= {theirs + name: w for name, w in zip(QKV, (q, k, v), strict=True)}
        out |= {theirs + hf: state[ours + name] for hf, name in LAYER_NAMES.items() if ours + name in state}
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Llama/Qwen3 weights under gpt2lab's names (q, k, v joined into c_attn); shapes are checked by the caller."""
    out = {"transformer.wte.weight": state.get("model.embed_tokens.weight"),
           "transformer.ln_f.weight": state.get("model.norm.weight")}  # fmt: skip
    if not config.tie_embeddings:
        out["lm_head.weight"] = state.get("lm_head.weight")
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        qkv = [state.get(theirs + name) for name in QKV]
        out[ours + "attn.c_attn.weight"] = torch.cat(qkv) if all(t is not None for t in qkv) else None
        out |= {ours + name: state.get(theirs + hf) for hf, name in LAYER_NAMES.items()}
    if not config.qk_norm:
        out = {k: v for k, v in out.items() if "_norm." not in k}
    return {k: v for k, v in out.items() if v is not None}  # a missing weight is named by check_and_load
