"""The zygote gives its free C-heap pages back before it forks, so a child's first mallocs
fault in fresh pages instead of copying the zygote's (see ``zygote._release_free_heap``)."""

from __future__ import annotations

import subprocess
import sys


def test_free_heap_pages_go_back_to_the_kernel() -> None:
    # Every other 64 KiB block freed, the last kept: glibc cannot shrink the heap from its
    # top, so only malloc_trim returns the free blocks' pages.
    code = """
import os
from ember_functions import zygote

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

blocks = [b"x" * (64 << 10) for _ in range(2048)]      # 128 MiB, touched
del blocks[::2]                                         # 64 MiB of free chunks
before = rss_bytes()
zygote._release_free_heap()
print((before - rss_bytes()) >> 20)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 48, f"only {done.stdout.strip()} MiB of 64 MiB freed went back"
