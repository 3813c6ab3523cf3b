"""The worker's and zygote's cyclic garbage collector: off while a program imports and
loads, frozen and back on once it serves, and never touched by merely importing them."""

from __future__ import annotations

import subprocess
import sys


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_worker_or_the_zygote_leaves_the_collector_alone() -> None:
    # Only `python -m ember_functions.worker` (or .zygote) switches it off: a gateway or a
    # test that imports these modules must not run without a collector from then on.
    code = "import gc, ember_functions.worker, ember_functions.zygote; print(gc.isenabled())"
    assert run(code) == "True"


def test_a_settled_worker_collects_again_but_not_what_it_loaded() -> None:
    code = """
import gc
from ember_functions import worker
gc.disable()
loaded = [[i] for i in range(1000)]          # what loading left behind
worker.gc_settled()
print(gc.isenabled(), gc.get_freeze_count() >= 1000, gc.get_count()[0] < 50)
"""
    assert run(code) == "True True True"
