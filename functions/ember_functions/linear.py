"""The matmul behind every projection, chosen once per model for its device and dtype.

On CPU in float32, oneDNN's inner-product primitive runs the skinny matrices of
batched decoding about twice as fast as the default BLAS path on the AMD machines
we measured (``bench/engine.py``), so it is used where torch exposes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")


def _onednn_works() -> bool:
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    try:
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        return bool(torch.allclose(_onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5))
    except RuntimeError:
        return False


def pick_linear(device: torch.device, dtype: torch.dtype) -> LinearFn:
    if device.type == "cpu" and dtype == torch.float32 and _onednn_works():
        return _onednn_linear
    return F.linear
