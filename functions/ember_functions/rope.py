"""Rotary position embeddings, Hugging Face "rotate half" layout.

The cos/sin tables are computed once per model in float32 and indexed by absolute
position, so chunked prefill and decode share one code path.
"""

from __future__ import annotations

import math

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
    """RoPE tables for every position; :meth:`angles` picks a step's rows once, and
    every layer rotates its query and key heads with them.

    The tables hold ``cos`` twice and ``sin`` with the first half negated, so that
    rotate-half is one multiply-add over the whole head: ``x * cos + swap(x) * sin``,
    where ``swap`` exchanges the two halves. That is the textbook
    ``(x1 cos - x2 sin, x2 cos + x1 sin)`` bit for bit (negating a product is exact).
    """

    cos: torch.Tensor  # [max_positions, head_dim]
    sin: torch.Tensor  # [max_positions, head_dim], first half negated

    def __init__(self, config: ModelConfig, *, max_positions: int, device: torch.device) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(config).to(device)
        t = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # [max_positions, head_dim // 2]
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def angles(self, positions: torch.Tensor) -> RopeAngles:  # positions: [T]
        """The rows of a step's tokens, gathered once for all layers."""
        return RopeAngles(self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))


class RopeAngles:
    """One step's RoPE rows; ``rotate`` applies them to ``[T, heads, head_dim]``."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos = cos  # [T, 1, head_dim] float32
        self.sin = sin  # [T, 1, head_dim] float32, first half negated

    def rotate(self, x: torch.Tensor) -> torch.Tensor:  # [T, heads, head_dim]
        # In float32 whatever the activation dtype, as the reference computes it.
        xf = x.float()
        half = x.shape[-1] // 2
        swapped = torch.cat((xf[..., half:], xf[..., :half]), dim=-1)  # a new tensor
        out = xf * self.cos  # a new tensor too: xf may be x itself (float32)
        out.add_(swapped.mul_(self.sin))
        return out if x.dtype == torch.float32 else out.to(x.dtype)
