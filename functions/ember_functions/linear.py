"""The matmul behind every projection, chosen once per model for its device and dtype.

Two CPU facts drive this (measured on this project's 2-core AVX2 machines; see
``bench/engine.py``):

* In float32, oneDNN's inner-product primitive runs the skinny matrices of batched
  decoding about twice as fast as the default BLAS path, so it is used where torch
  exposes it.
* A single decoding sequence is bound by memory bandwidth, not arithmetic. When the
  checkpoint is bf16 but the CPU computes in float32, streaming the bf16 copy of each
  matrix halves the bytes read per token. ``Linear`` then takes that copy for
  single-row inputs and the float32 weights for everything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


class Linear:
    """``y = x @ w.T + b`` with the fastest kernel for the row count.

    ``gemv`` is an optional low-precision copy of ``w`` (same values: the checkpoint's
    own bf16) used when ``x`` has one row.
    """

    def __init__(self, *, device: torch.device, dtype: torch.dtype) -> None:
        self.onednn = device.type == "cpu" and dtype == torch.float32 and _onednn_works()

    def __call__(
        self,
        x: torch.Tensor,  # [T, in]
        w: torch.Tensor,  # [out, in]
        b: torch.Tensor | None = None,  # [out]
        gemv: torch.Tensor | None = None,  # [out, in], low precision
    ) -> torch.Tensor:  # [T, out]
        if gemv is not None and x.shape[0] == 1:
            y = F.linear(x.to(gemv.dtype), gemv).to(x.dtype)
            return y if b is None else y + b
        if self.onednn:
            return _onednn_linear(x, w, b)
        return F.linear(x, w, b)
