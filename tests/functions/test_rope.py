"""The per-step RoPE and RMSNorm forms the model runs are, to the bit, the reference
formulas they replaced: a cheaper form that rounded differently would flip near-tie
greedy tokens (see the README's prompt note)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember_functions.model import RMSNorm
from ember_functions.rope import RopeAngles, apply_rope


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, D]; cos, sin [T, 1, D/2] float32: transformers' rotate-half, in float32.
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 14, 300])
def test_apply_rope_is_the_reference_to_the_bit(dtype: torch.dtype, tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    x = (torch.randn(tokens, 12, 64, generator=g) * 4).to(dtype)
    angle = torch.rand(tokens, 1, 32, generator=g) * 100
    cos, sin = angle.cos(), angle.sin()
    angles = RopeAngles(torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1))
    before = x.clone()
    assert torch.equal(apply_rope(x, angles), reference_rope(x, cos, sin))
    assert torch.equal(x, before)  # the input (a view of the QKV projection) is untouched


def test_rope_of_a_strided_view_leaves_its_base_alone() -> None:
    qkv = torch.randn(5, 3 * 64)  # float32: x.float() is x itself, so no copy protects it
    before = qkv.clone()
    angles = RopeAngles(torch.rand(5, 1, 64), torch.rand(5, 1, 64))
    out = apply_rope(qkv[:, : 2 * 64].view(5, 2, 64), angles)
    assert torch.equal(qkv, before)
    assert out.shape == (5, 2, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_reference_to_the_bit(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    norm = RMSNorm(576, 1e-5)
    norm.weight = torch.nn.Parameter(torch.randn(576, generator=g).to(dtype), requires_grad=False)
    for tokens in (1, 14, 300):
        x = (torch.randn(tokens, 576, generator=g) * 3).to(dtype)
        xf = x.float()
        expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(
            dtype
        )
        assert torch.equal(norm(x), expected)
        assert torch.equal(
            F.rms_norm(xf, (576,), eps=1e-5),
            xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5),
        )
