"""A bound on the matmul kernels a worker keeps, so its memory stays flat over its life.

On CPU every projection is a oneDNN primitive (``linear.py``), built for one shape, and the
row count is part of the shape: a worker meets a new one with nearly every prompt length
and batch size it serves. torch keeps up to 1024 primitives in each of two caches
(ideep's, ``LRU_CACHE_CAPACITY``, and oneDNN's, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), at
~0.65 MB apiece for SmolLM2's matrices: a packed SmolLM2 engine grew by 358 MiB of RSS
over 128 prompts of new lengths, more than the model's own 270 MB, and would keep growing
to ~1024 primitives per cache. Capped at 128 entries each it grew 106 MiB over the same
prompts, at the same median step time (``bench/kernel_caches.py``). A miss costs ~0.6 ms
per matrix shape (four per layer, shared by every layer) on the step that meets a new row
count, which a hit saves: the common ones (small decode batches) stay cached.

Imports no torch: a worker sets this first thing, before its imports.
"""

from __future__ import annotations

import os

__all__ = ["KERNEL_CACHE_ENTRIES", "bound_kernel_caches"]

KERNEL_CACHE_ENTRIES = 128
_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> dict[str, str]:
    """Caps both primitive caches at ``entries`` each in this process's environment,
    unless the environment already sets them (the operator's choice wins). torch reads
    them when the process builds its first primitive, so call it before any matmul;
    returns the settings in force.

    Example::

        bound_kernel_caches()  # first thing in a worker's main()
    """
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 0:
        raise ValueError(f"entries must be a count >= 0, got {entries!r}")
    for name in _CACHES:
        os.environ.setdefault(name, str(entries))
    return {name: os.environ[name] for name in _CACHES}
