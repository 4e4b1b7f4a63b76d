"""Hugging Face DeepSeek-V3 folders in and out, for the [model] switches that make that network.

Multi-head latent attention + RoPE + RMSNorm + SwiGLU + no biases is exactly ``DeepseekV3ForCausalLM``,
with dense MLPs in every block (``first_k_dense_replace = num_hidden_layers``) or with mixtures of experts
(gpt2lab.model.moe) in the last blocks routing as DeepSeek-V3 does: sigmoid scores, the routing bias
``e_score_correction_bias`` steering the choice only, group-limited routing (``n_group``, ``topk_group``),
gate weights times ``routed_scaling_factor``, shared experts (ROUTING_NAMES: those fields both ways). The attention
weights keep transformers' names (gpt2lab.model.gpt's MultiHeadLatentAttention uses them) but for the output
projection (c_proj: o_proj); routed experts are written one tensor per expert, as ``save_pretrained`` writes them.
DeepSeek's checkpoints rotate neighbouring RoPE dimensions together (``rope_interleave``), gpt2lab the
two halves (Llama's layout): the RoPE rows of the query and of the shared key are permuted on the way
in and out, so exported folders are laid out like DeepSeek's own. YaRN is written as DeepSeek writes it
(mscale = mscale_all_dim = 1: the temperature on the softmax scale). ``transformers`` is never imported.
"""

from __future__ import annotations

import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop import llama as hf_llama
from gpt2lab.interop import moe as hf_moe
from gpt2lab.model.config import GPTConfig

MODEL_TYPE, CLASS = "deepseek_v3", "DeepseekV3ForCausalLM"
# what the network must be (besides attention = "mla") to be DeepSeek-V3's
REQUIRED = hf_llama.REQUIRED  # pos_embedding=rope, norm=rmsnorm, mlp=swiglu, bias=false
MLA_NAMES = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
# per layer: Hugging Face name -> gpt2lab name
LAYER_NAMES = {
    **{f"self_attn.{name}.weight": f"attn.{name}.weight" for name in MLA_NAMES},
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    **{hf: ours for hf, ours in hf_llama.LAYER_NAMES.items() if not hf.startswith("self_attn.")},  # MLP, norms
}
# an MoE block's shared experts (one SwiGLU): Hugging Face name -> gpt2lab name
SHARED_NAMES = {"gate_proj": "c_gate", "up_proj": "c_fc", "down_proj": "c_proj"}
# DeepseekV3MoE's routing options: Hugging Face name -> (gpt2lab field, DeepseekV3Config's default where unset)
ROUTING_NAMES = {"n_group": ("moe_n_group", 8), "topk_group": ("moe_topk_group", 4),
                 "routed_scaling_factor": ("moe_routed_scaling_factor", 2.5)}  # fmt: skip


def _layer_names(config: GPTConfig, layer: int) -> dict[str, str]:
    """LAYER_NAMES for this block: the plain query projection or the query latent's weights; no dense MLP if MoE."""
    absent = ("q_a_proj", "q_a_layernorm", "q_b_proj") if not config.q_lora_rank else ("q_proj",)
    if layer in config.moe_layer_ids:
        absent += ("gate_proj", "up_proj", "down_proj")
    return {hf: ours for hf, ours in LAYER_NAMES.items() if hf.split(".")[1] not in absent}


def first_moe_layer(config: GPTConfig) -> int:
    """DeepSeek-V3's first_k_dense_replace: the blocks before it are dense (n_layer: no MoE)."""
    return config.n_layer - len(config.moe_layer_ids)


def check_exportable(config: GPTConfig) -> None:
    """One error naming each switch that keeps an MLA model from being DeepseekV3ForCausalLM."""
    required = dict(REQUIRED) if first_moe_layer(config) else {k: v for k, v in REQUIRED.items() if k != "mlp"}
    changed = [f"model.{k}={getattr(config, k)}" for k, v in required.items() if getattr(config, k) != v]
    if config.n_experts and config.moe_router != "sigmoid":
        changed.append(f"model.moe_router={config.moe_router}")
    if config.moe_layer_ids != tuple(range(first_moe_layer(config), config.n_layer)):
        changed.append(f"model.moe_layers={config.moe_layers} (DeepSeek-V3: MoE in the last blocks only)")
    if config.n_experts == 1:  # DeepSeek-V3 ranks expert groups by their two best scores
        changed.append("model.n_experts=1")
    if changed:
        need = ", ".join(f"model.{k}={v}" for k, v in REQUIRED.items())
        raise Gpt2LabError(
            f"export: model.attention=mla with {', '.join(changed)} has no Hugging Face equivalent: {CLASS} "
            f"takes {need}, and MoE (if any) with model.moe_router=sigmoid in the last blocks; the checkpoint "
            "itself samples, evaluates and trains"
        )


def rope_parameters(config: GPTConfig) -> dict:
    """transformers' rope_parameters, YaRN as DeepSeek writes it: the temperature on the softmax, not on cos/sin."""
    params = hf_llama.rope_parameters(config)
    if config.rope_scaling == "yarn":
        params |= {"mscale": 1.0, "mscale_all_dim": 1.0}
    return params


def config_to_hf(config: GPTConfig) -> dict:
    """config.json of DeepseekV3ForCausalLM: dense blocks, then MoE blocks if any (vocabulary unpadded)."""
    dims = config.mla_dims
    hf = {
        "architectures": [CLASS],
        "model_type": MODEL_TYPE,
        "first_k_dense_replace": first_moe_layer(config),  # the dense blocks (all of them without MoE)
        "num_nextn_predict_layers": 0,  # no multi-token prediction module
        "num_key_value_heads": config.n_head,  # MLA decompresses a key and value for every head
        "kv_lora_rank": dims.kv_lora_rank,
        "q_lora_rank": dims.q_lora_rank or None,  # None: a plain q_proj
        "qk_nope_head_dim": dims.qk_nope_head_dim,
        "qk_rope_head_dim": dims.qk_rope_head_dim,
        "v_head_dim": dims.v_head_dim,
        "rope_interleave": True,  # the weights are written in DeepSeek's layout (see to_hf_state_dict)
    } | hf_llama.shared_fields(config, rope_parameters(config))
    if config.n_experts:
        hf |= {"n_routed_experts": config.n_experts, "num_experts_per_tok": config.experts_per_token,
               "moe_intermediate_size": config.expert_hidden, "n_shared_experts": config.n_shared_experts,
               "norm_topk_prob": config.moe_norm_topk_prob,
               **{name: getattr(config, ours) for name, (ours, _) in ROUTING_NAMES.items()}}  # fmt: skip
    return hf  # bos_token_id, eos_token_id: export_hf's, the tokenizer's <|endoftext|> (not DeepseekV3Config's 0, 1)


def _check_rope(hf: dict, source) -> None:
    """YaRN must be DeepSeek's (temperature on the softmax scale, the paper's ramp): what gpt2lab computes."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "yarn":
        return
    expected = {"mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1, "attention_factor": None}
    odd = [f"{k}={params.get(k)}" for k, v in expected.items() if params.get(k, v) != v]
    odd += [f"no {k}" for k in ("mscale", "mscale_all_dim") if k not in params]  # else transformers scales cos/sin
    if odd:
        raise Gpt2LabError(f"{source}: yarn with {', '.join(odd)} is not supported (gpt2lab: mscale_all_dim = 1)")


def config_from_hf(hf: dict, source) -> GPTConfig:
    """A GPTConfig from a DeepSeek-V3 config.json with dense layers; options gpt2lab does not build are an error."""
    unsupported = [k for k in ("attention_bias",) if hf.get(k)]
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']}")
    heads = hf.get("num_attention_heads")
    if hf.get("num_key_value_heads", heads) != heads:
        unsupported.append(f"num_key_value_heads={hf['num_key_value_heads']} (MLA: num_attention_heads)")
    if unsupported:
        raise Gpt2LabError(f"{source}: deepseek_v3 with {', '.join(map(str, unsupported))} is not supported")
    _check_rope(hf, source)
    try:
        moe = _moe_from_hf(hf)
        return GPTConfig(
            block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], mlp_hidden=hf["intermediate_size"],
            layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention="mla", kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank") or 0,
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], **hf_llama._rope(hf), **REQUIRED, **moe,
        )  # fmt: skip
    except KeyError as e:
        raise Gpt2LabError(f"{source}: missing key {e}") from None
    except (TypeError, ValueError, Gpt2LabError) as e:
        raise Gpt2LabError(f"{source}: {e}") from None


def _moe_from_hf(hf: dict) -> dict:
    """gpt2lab's MoE fields for the MoE blocks of a DeepSeek-V3 config.json (none: {}); its defaults where unset."""
    layers, first = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 3)
    if first >= layers or not hf.get("n_routed_experts", 256):
        return {}
    routing = {ours: hf.get(name, default) for name, (ours, default) in ROUTING_NAMES.items()}
    return dict(n_experts=hf.get("n_routed_experts", 256), experts_per_token=hf.get("num_experts_per_tok", 8),
                moe_hidden=hf.get("moe_intermediate_size", 2048), n_shared_experts=hf.get("n_shared_experts", 1),
                moe_router="sigmoid", moe_norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                moe_layers="all" if first <= 0 else ",".join(map(str, range(first, layers)))) | routing  # fmt: skip


def _permute_rope_rows(weight: torch.Tensor, rows_per_head: int, rope_dim: int, to_interleaved: bool) -> torch.Tensor:
    """The last rope_dim rows of each group of rows_per_head, between half-split and interleaved RoPE layouts.

    Half-split rotates the pair (i, i + d/2), interleaved the pair (2i, 2i + 1), both by frequency i: so
    half-split row i is interleaved row 2i and half-split row d/2 + i is interleaved row 2i + 1.
    """
    half_split = torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))  # its interleaved rows
    order = torch.argsort(half_split) if to_interleaved else half_split
    w = weight.reshape(-1, rows_per_head, weight.size(-1))  # (groups, rows_per_head, in)
    w = torch.cat((w[:, :-rope_dim], w[:, -rope_dim:][:, order]), dim=1)
    return w.reshape(weight.shape)


def _convert_rope(state: dict[str, torch.Tensor], config: GPTConfig, to_interleaved: bool) -> dict[str, torch.Tensor]:
    """Every query and shared-key weight's RoPE rows permuted (state under Hugging Face's names)."""
    dims = config.mla_dims
    out = dict(state)
    for key, tensor in state.items():
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):  # per head: nope, then rope rows
            rows = dims.qk_nope_head_dim + dims.qk_rope_head_dim
            out[key] = _permute_rope_rows(tensor, rows, dims.qk_rope_head_dim, to_interleaved)
        elif key.endswith("self_attn.kv_a_proj_with_mqa.weight"):  # the latent's rows, then the RoPE key's
            rows = dims.kv_lora_rank + dims.qk_rope_head_dim
            out[key] = _permute_rope_rows(tensor, rows, dims.qk_rope_head_dim, to_interleaved)
    return out


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under DeepSeek-V3's names and RoPE layout, vocabulary unpadded (a tied head left out)."""
    cfg, V = model.config, model.config.vocab_size
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"][:V],
           "model.norm.weight": state["transformer.ln_f.weight"]}  # fmt: skip
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][:V]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        out |= {theirs + hf: state[ours + name] for hf, name in _layer_names(cfg, i).items()}
        if i in cfg.moe_layer_ids:
            out |= _moe_to_hf(state, ours + "mlp.", theirs + "mlp.", cfg.n_experts)
    return {k: v.contiguous() for k, v in _convert_rope(out, cfg, to_interleaved=True).items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig, rope_interleave: bool = True):
    """DeepSeek-V3 weights under gpt2lab's names, RoPE rows half-split; shapes are checked by the caller."""
    if rope_interleave:
        state = _convert_rope(state, config, to_interleaved=False)
    out = {"transformer.wte.weight": state.get("model.embed_tokens.weight"),
           "transformer.ln_f.weight": state.get("model.norm.weight")}  # fmt: skip
    if not config.tie_embeddings:
        out["lm_head.weight"] = state.get("lm_head.weight")
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        out |= {ours + name: state.get(theirs + hf) for hf, name in _layer_names(config, i).items()}
        if i in config.moe_layer_ids:
            out |= _moe_from_hf_state(state, ours + "mlp.", theirs + "mlp.", config)
    return {k: v for k, v in out.items() if v is not None}  # a missing weight is named by check_and_load


def _moe_to_hf(state: dict[str, torch.Tensor], ours: str, theirs: str, n_experts: int) -> dict[str, torch.Tensor]:
    """One MoE block's router, routing bias, routed experts (one tensor each) and shared experts, DeepSeek's names."""
    gate, up = state[ours + "experts.gate_up_proj"].chunk(2, dim=1)  # (E, H, C) each: gate rows first
    down = state[ours + "experts.down_proj"]  # (E, C, H)
    out = {theirs + "gate.weight": state[ours + "gate.weight"],
           theirs + "gate.e_score_correction_bias": state[ours + "e_score_correction_bias"]}  # fmt: skip
    for e in range(n_experts):
        for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            out[f"{theirs}experts.{e}.{name}.weight"] = w[e]
    C = down.size(1)
    for hf, name in SHARED_NAMES.items():  # none: DeepseekV3MoE still has them, 0 wide, so write them empty
        empty = torch.zeros((C, 0) if hf == "down_proj" else (0, C), dtype=down.dtype)
        out[f"{theirs}shared_experts.{hf}.weight"] = state.get(f"{ours}shared_experts.{name}.weight", empty)
    return out


def _moe_from_hf_state(state: dict[str, torch.Tensor], ours: str, theirs: str, config: GPTConfig) -> dict:
    """One MoE block's weights under gpt2lab's names, routed experts stacked into gpt2lab.model.moe's 3-D tensors."""
    gate_up, down = hf_moe._experts(state, theirs, config.n_experts)  # per-expert files or transformers' fused ones
    out = {ours + "gate.weight": state.get(theirs + "gate.weight"), ours + "experts.gate_up_proj": gate_up,
           ours + "experts.down_proj": down,
           ours + "e_score_correction_bias": state.get(theirs + "gate.e_score_correction_bias")}  # fmt: skip
    if config.n_shared_experts:
        out |= {f"{ours}shared_experts.{name}.weight": state.get(f"{theirs}shared_experts.{hf}.weight")
                for hf, name in SHARED_NAMES.items()}  # fmt: skip
    return out
