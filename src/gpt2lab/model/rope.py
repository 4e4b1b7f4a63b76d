"""Rotary position embeddings (RoPE, Su et al. 2021) in Llama's half-split layout, and their context extensions:
linear position interpolation (Chen et al. 2023) and YaRN (Peng et al. 2023)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gpt2lab.model.config import GPTConfig

# YaRN's ramp: dimensions turning over 32 times in the original context keep their frequency, under once interpolate
YARN_BETA_FAST, YARN_BETA_SLOW = 32, 1


def rope_frequencies(config: GPTConfig, device=None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (rope_dim/2,) and the factor on cos/sin (YaRN's attention temperature).

    linear: every frequency divided by the factor s (position interpolation, Chen et al. 2023).
    yarn (Peng et al. 2023): dimensions that turn many times within the original context keep their
    frequency, slow ones are interpolated by s, a linear ramp in between; cos and sin are scaled by
    0.1 ln s + 1 (the paper's sqrt(1/t), applied to q and k alike). MLA takes that factor in its
    softmax scale instead, as DeepSeek does, since only part of its q and k is rotated: 1 here.
    """
    hs, theta, s = config.rope_dim, config.rope_theta, config.rope_factor
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)  # (hs/2,)
    if config.rope_scaling == "linear":
        return inv_freq / s, 1.0
    if config.rope_scaling == "none":
        return inv_freq, 1.0
    original = config.rope_original_context or config.block_size

    def dim_turning(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times in `original`
        return hs * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_turning(YARN_BETA_FAST)), 0)
    high = min(math.ceil(dim_turning(YARN_BETA_SLOW)), hs - 1)
    ramp = ((torch.arange(hs // 2, device=device, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + inv_freq / s * ramp  # ramp 0: extrapolate (keep), 1: interpolate
    return inv_freq, (1.0 if config.attention == "mla" else yarn_mscale(config))


def yarn_mscale(config: GPTConfig) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln s + 1 on q and k; 1 without YaRN."""
    s = config.rope_factor
    return 0.1 * math.log(s) + 1.0 if config.rope_scaling == "yarn" and s > 1 else 1.0


class Rotary(nn.Module):
    """RoPE (Su et al. 2021): cos and sin of each position's rotation angles, in Llama's half-split layout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config  # read at each call, so a context extension (rope_scaling) applies at once

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # recomputed each call (hs/2 numbers): no buffer to save, or to lose when a model is built on "meta"
        inv_freq, scale = rope_frequencies(self.config, pos.device)
        angles = pos.float()[..., None] * inv_freq  # (T, hs/2), hs = config.rope_dim
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs): the same angle for x_i and x_{i + hs/2}
        if pos.dim() == 2:  # positions per row (B, T) -> (B, 1, T, hs): broadcast over the heads
            angles = angles.unsqueeze(1)
        return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their positions' angles; unchanged without RoPE."""
    if rope is None:
        return x
    cos, sin = rope  # (T, hs) each, or (B, 1, T, hs) with positions per row
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # the pair (x_i, x_{i + hs/2}) turned by 90 degrees
    return (x.float() * cos + rotated.float() * sin).type_as(x)
