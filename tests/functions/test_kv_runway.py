"""The KV runway: an idle engine faults in the pages of the fresh KV blocks its next
requests will write, and touches nothing else."""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable

import pytest
import torch

from ember_functions.engine import LLMEngine
from ember_functions.sampling_params import SamplingParams

EngineFactory = Callable[..., LLMEngine]
GREEDY_4 = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def resident_pages(t: torch.Tensor) -> list[bool]:
    """Per page of ``t``'s storage (contiguous), whether the kernel has it mapped (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = t.data_ptr() + t.numel() * t.element_size() - start
    pages = -(-length // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return [bool(v & 1) for v in vec]


def block_slab(engine: LLMEngine, start: int, stop: int) -> torch.Tensor:
    """Blocks ``start..stop-1`` of the first layer's K, first head: one contiguous run."""
    return engine.kv_cache.data[0, 0, 0, start:stop]


def test_runway_covers_one_step_of_fresh_blocks_then_costs_nothing(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(max_num_batched_tokens=64, block_size=16)  # a step: 4 blocks
    assert engine.extend_kv_runway() == 4
    assert engine.kv_cache.prefaulted_to == 4
    assert engine.extend_kv_runway() == 0  # whole: an idle turn costs a comparison
    engine.generate([list(range(40))], GREEDY_4)  # 44 tokens: 3 fresh blocks used
    assert engine.blocks.first_fresh_block == 3
    assert engine.extend_kv_runway() == 3  # blocks 4..6: the runway is 4 again
    assert engine.kv_cache.prefaulted_to == 7


@pytest.mark.skipif(sys.platform != "linux", reason="mincore on an anonymous mapping")
def test_runway_pages_are_mapped_and_the_rest_are_not(make_engine: EngineFactory) -> None:
    # Tiny model, float32: a block of one head of one layer is 16 x 16 x 4 B = 1 KiB,
    # so pages hold four blocks and a runway of 8 blocks is two pages of each slab.
    engine = make_engine(max_num_batched_tokens=128, num_kv_blocks=64)
    assert not any(resident_pages(block_slab(engine, 0, 64)))
    engine.extend_kv_runway()
    assert all(resident_pages(block_slab(engine, 0, 8)))
    assert not any(resident_pages(block_slab(engine, 8, 64)))
    assert all(resident_pages(engine.kv_cache.data[-1, 1, -1, 0:8]))  # every slab


def test_runway_never_writes_a_block_that_was_handed_out(make_engine: EngineFactory) -> None:
    engine = make_engine(max_num_batched_tokens=64)
    prompt = list(range(50))
    first = engine.generate([prompt], GREEDY_4)[0]
    used = engine.blocks.first_fresh_block  # 4: three cached blocks and a freed tail
    before = engine.kv_cache.data[:, :, :, :used].clone()
    engine.kv_cache.data[:, :, :, used:] = 7.0  # fresh blocks: what a write would show
    assert engine.extend_kv_runway() == 4
    assert torch.equal(engine.kv_cache.data[:, :, :, :used], before)
    assert (engine.kv_cache.data[:, :, :, used : used + 4] == 0).all()
    assert (engine.kv_cache.data[:, :, :, used + 4 :] == 7.0).all()
    # The cached prefix is intact: the same prompt again hits it and gets the same tokens.
    again = engine.generate([prompt], GREEDY_4)[0]
    assert again.usage.cached_tokens == 48
    assert again.token_ids == first.token_ids


def test_freed_blocks_are_reused_so_resident_memory_follows_load(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(max_num_batched_tokens=64, prefix_cache=False)
    for seed in range(20):  # one at a time: each reuses the blocks the last one freed
        engine.generate([[seed] * 30], GREEDY_4)
        engine.extend_kv_runway()
    assert engine.blocks.first_fresh_block == 3  # one request's worth, ever
    assert engine.kv_cache.prefaulted_to == 3 + 4
