"""The MLPs: GPT-2's (GELU), ReLU² (So et al. 2021) and SwiGLU (Shazeer 2020, as in Llama), and the factory that
picks one per block, or a mixture of experts (``gpt2lab.model.moe``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.model.config import GPTConfig
from gpt2lab.model.moe import MoE


class MLP(nn.Module):
    """GPT-2's MLP: Linear, tanh-approximate GELU, Linear."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class ReLU2MLP(MLP):
    """ReLU squared instead of GELU (So et al. 2021; modded-nanogpt, nanochat)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.relu(self.c_fc(x)).square()))


class SwiGLU(nn.Module):
    """Llama's MLP (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or config.hidden  # another width for MoE's shared experts
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)  # Llama's up_proj
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))


MLPS = {"gelu": MLP, "swiglu": SwiGLU, "relu2": ReLU2MLP}


def make_mlp(config: GPTConfig, layer: int) -> nn.Module:
    """The MLP of block `layer`: the dense one picked by config.mlp, or a mixture of experts (gpt2lab.model.moe)."""
    if layer not in config.moe_layer_ids:
        return MLPS[config.mlp](config)
    shared = config.n_shared_experts * config.expert_hidden
    return MoE(config, SwiGLU(config, shared) if shared else None)
