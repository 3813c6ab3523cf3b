"""An engine's packed copies give their RAM back to the machine when dropped: given back
under pressure (``Packing.unpack``), the freed pages leave the process, not just its heap
(glibc keeps most freed blocks of a few MiB for reuse unless trimmed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.host_memory import read_process_memory

MIB = 1 << 20


def anonymous_bytes() -> int:
    memory = read_process_memory(os.getpid())
    if memory is None:
        pytest.skip("no /proc/PID/smaps_rollup here")
    return memory.anonymous_bytes


def test_unpacking_every_layer_returns_the_packed_copies_to_the_os(smollm2_dir: Path) -> None:
    # Two threads, as a worker here runs: oneDNN packs on its OpenMP threads, and their
    # malloc arenas keep what they free (182 of ~250 MiB stayed, untrimmed; with one
    # thread, the main arena's large blocks are unmapped at once).
    config = EngineConfig(num_threads=2, kv_cache_bytes=16 << 20)
    engine = LLMEngine.from_dir(smollm2_dir, config=config)
    if not engine.model.linear.packs:
        pytest.skip("oneDNN packing does not apply on this CPU")
    before = anonymous_bytes()
    assert engine.packing.pack()
    packed = anonymous_bytes() - before
    assert packed > 200 * MIB  # SmolLM2's packed bf16 matrices: ~256 MiB
    freed = 0
    while step := engine.packing.unpack():
        freed += step
    assert freed > 200 * MIB
    assert anonymous_bytes() - before < packed * 0.25
