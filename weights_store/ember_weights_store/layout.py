"""Where tensors sit in a model's flat per-dtype buffers, and how buffers split into chunks.

Pure functions: the importer plans a layout with them, the manifest records it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ember_core import InvalidRequestError
from ember_weights_store.manifest import (
    ALIGNMENT_BYTES,
    DEFAULT_CHUNK_SIZE_BYTES,
    DTYPE_SIZES,
    TensorEntry,
    check_chunk_size,
)


def _align(n: int) -> int:
    return -(-n // ALIGNMENT_BYTES) * ALIGNMENT_BYTES


# Name order, except that the projections an engine fuses sit side by side in the order
# it fuses them (q, k, v; gate, up): their concatenation is then a view of the loaded
# buffer instead of a copy. Plain name order would put k, o, q, v.
_FUSED = re.compile(r"\.(q|k|v)_proj\.")
_QKV_RANK = {"q": "0", "k": "1", "v": "2"}


def layout_key(name: str) -> str:
    """The sort key of a tensor name in a flat buffer."""
    return _FUSED.sub(lambda m: f".{_QKV_RANK[m.group(1)]}{m.group(1)}_proj.", name)


def plan_chunks(
    tensors: Sequence[tuple[str, str, Sequence[int], int]],
    *,
    chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
) -> tuple[list[TensorEntry], dict[str, int]]:
    """Lay ``(name, dtype, shape, nbytes)`` tensors out in one flat buffer per dtype.

    Tensors are placed in a canonical name order (:func:`layout_key`), not input order, so a
    model resharded or re-exported in another order gets the same layout and thus the same
    chunks (deduplicated). Each starts on
    a 64-byte boundary; each buffer's size is rounded up to 64 bytes (padding is zeros). Cut
    each buffer into chunks with ``chunk_ranges``.
    """

    def invalid(msg: str) -> InvalidRequestError:
        return InvalidRequestError(msg, param="chunk_size_bytes")

    check_chunk_size(chunk_size_bytes, invalid)
    ends: dict[str, int] = {}
    entries: list[TensorEntry] = []
    seen: set[str] = set()
    for name, dtype, shape, nbytes in sorted(tensors, key=lambda t: layout_key(t[0])):
        if name in seen:
            raise InvalidRequestError(f"tensor {name!r} appears twice", param="tensors")
        seen.add(name)
        if dtype not in DTYPE_SIZES:
            raise InvalidRequestError(
                f"tensor {name!r} has dtype {dtype!r}, which the store does not support "
                f"(supported: {', '.join(DTYPE_SIZES)})",
                param="tensors",
            )
        dims = tuple(shape)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims) or (
            nbytes != math.prod(dims) * DTYPE_SIZES[dtype]
        ):
            raise InvalidRequestError(
                f"tensor {name!r}: shape {list(dims)} of {dtype} does not match {nbytes} bytes",
                param="tensors",
            )
        entry = TensorEntry(name, dtype, dims, _align(ends.get(dtype, 0)), nbytes)
        entries.append(entry)
        ends[dtype] = entry.end_bytes
    return entries, {dtype: _align(end) for dtype, end in sorted(ends.items())}


def chunk_ranges(
    buffer_size: int, *, chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES
) -> list[tuple[int, int]]:
    """``(offset, size)`` of every chunk of a flat buffer: fixed size, the last one shorter."""

    def invalid(msg: str) -> InvalidRequestError:
        return InvalidRequestError(msg, param="chunk_size_bytes")

    check_chunk_size(chunk_size_bytes, invalid)
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 0:
        raise InvalidRequestError(
            f"buffer_size must be a non-negative integer, got {buffer_size!r}", param="buffer_size"
        )
    return [
        (off, min(chunk_size_bytes, buffer_size - off))
        for off in range(0, buffer_size, chunk_size_bytes)
    ]
