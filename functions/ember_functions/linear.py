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

A weight reordered once into oneDNN's blocked layout (:meth:`Linear.pack`) skips the
reorder oneDNN otherwise does on every call. In bf16 on the AVX512-BF16 machines that
ran 1.2x (512 rows) to 2.5x (one row) faster than ``F.linear``; in float32 on the AVX2
machines, SmolLM2's four matrices per layer take 0.48 / 0.62 / 1.01 / 1.92 ms at 4 / 8 /
16 / 37 rows packed against 0.84 / 0.97 / 1.36 / 2.36 ms unpacked, and within 3% of it
from 64 rows up (``python bench/linear.py``). Packing copies the matrix (~0.15 s per GB
on 2 cores), so an engine packs after it is serving, not while it binds
(``Packing.pack``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + b`` through oneDNN's inner product; ``w`` plain or ``Linear.pack``-ed."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")


@functools.cache  # a property of this torch build and CPU: probed once per process
def _onednn_works() -> bool:
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    try:
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        return bool(torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5))
    except RuntimeError:
        return False


# The row count oneDNN blocks a packed weight for. 512 (a prefill chunk) measured best
# for every row count from 1 to 512 on the 2-core AVX512-BF16 machines.
_PACK_ROWS = 512


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    if not (
        dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    try:
        x, w = torch.randn(3, 64).to(dtype), torch.randn(32, 64).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_ROWS)
        atol = 1e-2 if dtype == torch.bfloat16 else 1e-4
        return bool(torch.allclose(onednn_linear(x, packed, None), F.linear(x, w), atol=atol))
    except (RuntimeError, AttributeError):
        return False


class Linear:
    """``y = x @ w.T + b`` with the fastest kernel for the row count.

    ``gemv`` is an optional low-precision copy of ``w`` (same values: the checkpoint's
    own bf16) used when ``x`` has one row; ``packed`` is ``pack(w)``, used for every
    other row count when given.
    """

    pack_rows = _PACK_ROWS  # what pack() blocks for: part of a packed matrix's identity

    def __init__(self, *, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.onednn = device.type == "cpu" and dtype == torch.float32 and _onednn_works()
        # Where a matrix left in its checkpoint dtype (``w`` on the meta device, see
        # ``weights.build_model``) is converted for a multi-row call: one buffer, the
        # size of the largest, reused by every call, so its pages are faulted in once.
        self._scratch = torch.empty(0, device=device, dtype=dtype)  # [largest numel]

    @functools.cached_property
    def packs(self) -> bool:
        """Whether :meth:`pack` applies. Probed when first asked, which is when an idle
        worker starts packing, so the probe (~10 ms: oneDNN's first call) stays off the
        bind and the first request."""
        return self.device.type == "cpu" and _packing_works(self.dtype)

    def pack(self, w: torch.Tensor) -> torch.Tensor | None:  # [out, in] -> opaque oneDNN
        """A copy of ``w`` in oneDNN's blocked layout, or None where packing does not
        apply (not a CPU, float16, or a torch built without oneDNN)."""
        if not self.packs:
            return None
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _PACK_ROWS)

    def __call__(
        self,
        x: torch.Tensor,  # [T, in]
        w: torch.Tensor,  # [out, in]
        b: torch.Tensor | None = None,  # [out]
        gemv: torch.Tensor | None = None,  # [out, in], low precision
        packed: torch.Tensor | None = None,  # pack(w)
    ) -> torch.Tensor:  # [T, out]
        if gemv is not None and x.shape[0] == 1:
            y = F.linear(x.to(gemv.dtype), gemv).to(x.dtype)
            return y if b is None else y + b
        if packed is not None:
            return onednn_linear(x, packed, b)
        if w.is_meta:
            if gemv is None:
                raise RuntimeError(
                    f"a {tuple(w.shape)} matrix was left unconverted without a single-row "
                    "copy to convert from; build the model with weights.build_model"
                )
            w = self.converted(gemv)
        if self.onednn:
            return onednn_linear(x, w, b)
        return F.linear(x, w, b)

    def converted(self, w: torch.Tensor) -> torch.Tensor:  # [out, in], in self.dtype
        """``w`` converted to the compute dtype in the shared scratch buffer: valid until
        the next call. Reading the 16-bit copy and writing the buffer, which stays in
        cache for SmolLM2's matrices, costs ~4 ms of a 14-row prefill's ~55 ms there;
        converting every matrix at bind instead faults in float32 pages for the whole
        model, 1.8-5.4 s for the 1.1B one on a 2-core VM (``bench/coldstart.py``)."""
        if self._scratch.numel() < w.numel():
            self._scratch = torch.empty(w.numel(), device=self.device, dtype=self.dtype)
        return self._scratch[: w.numel()].view(w.shape).copy_(w)

    def free_scratch(self) -> None:
        """Gives the scratch buffer back: once every matrix is packed no call converts
        (an untied 1.1B LM head made it 262 MB)."""
        self._scratch = torch.empty(0, device=self.device, dtype=self.dtype)
