"""Rotary position embeddings, Hugging Face "rotate half" layout.

The cos/sin tables are computed once per model in float32 and indexed by absolute
position, so chunked prefill and decode share one code path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ember_functions.config import ModelConfig, RopeScaling


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, ``[head_dim // 2]`` float32."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly (same formula as transformers' rope utils).
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """RoPE's cos/sin tables by absolute position; :meth:`angles` gathers a step's rows,
    which :func:`apply_rope` applies to every layer's query and key heads."""

    cos: torch.Tensor  # [max_positions, head_dim // 2]
    sin: torch.Tensor  # [max_positions, head_dim // 2]

    def __init__(self, config: ModelConfig, *, max_positions: int, device: torch.device) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(config).to(device)
        t = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def angles(self, positions: torch.Tensor) -> RopeAngles:
        """The rotation for ``positions`` [T], gathered once per step for every layer."""
        cos, sin = self.cos[positions], self.sin[positions]  # [T, D/2] each
        # [T, 1, D]: cos for both halves; -sin for the first half, +sin for the second.
        return RopeAngles(
            torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)
        )


class RopeAngles(NamedTuple):
    cos: torch.Tensor  # [T, 1, D] float32
    sin: torch.Tensor  # [T, 1, D] float32, the first half negated


def apply_rope(x: torch.Tensor, angles: RopeAngles) -> torch.Tensor:
    """Rotates ``x`` [T, heads, D] (query and key heads stacked), in float32 whatever its
    dtype, as the reference does. ``x * cos + swap_halves(x) * sin`` with the first half
    of ``sin`` negated is, to the bit, the reference's ``cat(x1*cos - x2*sin, x2*cos +
    x1*sin)`` (``a - b*s`` is ``a + b*(-s)`` exactly in IEEE arithmetic), in six ops
    instead of ten."""
    xf = x.float()
    rotated = xf.roll(x.shape[-1] // 2, dims=-1).mul_(angles.sin)
    out = xf.mul_(angles.cos) if xf is not x else xf * angles.cos
    out = out.add_(rotated)
    return out if x.dtype == torch.float32 else out.to(x.dtype)
