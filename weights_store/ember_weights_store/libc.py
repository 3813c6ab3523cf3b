"""libc's ``mmap``, ``munmap`` and ``madvise`` through ctypes, typed once for the store.

Python's ``mmap`` module can neither place a mapping at a chosen address (``mapping.py``
lays chunk files side by side) nor populate one (``page_cache.py``). ctypes releases the
GIL for the call. Imports no torch: the readahead path uses it while torch imports.
"""

from __future__ import annotations

import ctypes

__all__ = ["MAP_FAILED", "libc"]

MAP_FAILED = ctypes.c_void_p(-1).value

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
