"""A load's scratch for object-tier chunks: per thread and purpose, reused, and given back
whole when the load is done; a process that loaded from the bucket keeps none of it."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ember_weights_store.load_scratch import LoadScratch


def _address(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_thread_reuses_its_buffer_for_a_purpose_and_grows_it_when_short() -> None:
    scratch = LoadScratch()
    first = scratch.buffer("stored", 1 << 20)
    where = _address(first)
    del first
    again = scratch.buffer("stored", 1 << 19)  # smaller: the same pages
    assert _address(again) == where and len(again) == 1 << 19
    other = scratch.buffer("decoded", 1 << 19)  # another purpose: its own
    assert _address(other) != where
    del again, other
    bigger = scratch.buffer("stored", 2 << 20)
    assert len(bigger) == 2 << 20
    del bigger
    assert scratch.mapped_bytes == (1 << 20) + (1 << 19) + (2 << 20)
    scratch.close()
    assert scratch.mapped_bytes == 0
    with pytest.raises(RuntimeError, match="closed"):
        scratch.buffer("stored", 1 << 22)


def test_a_floor_maps_every_buffer_once_however_sizes_vary() -> None:
    scratch = LoadScratch(floor_bytes=1 << 20)
    where = _address(scratch.buffer("stored", 1000))
    for size in (5000, 1 << 20, 7):
        view = scratch.buffer("stored", size)
        assert _address(view) == where and len(view) == size
        del view
    assert scratch.mapped_bytes == 1 << 20
    scratch.close()


def test_threads_get_buffers_of_their_own() -> None:
    scratch = LoadScratch()
    addresses: list[int] = []

    def take() -> None:
        view = scratch.buffer("stored", 4096)
        view[:] = b"x" * 4096  # writable
        addresses.append(_address(view))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(addresses)) == 4
    scratch.close()


@pytest.mark.slow
def test_a_load_from_the_bucket_leaves_no_heap_behind(tmp_path: Path) -> None:
    # Eight load threads fetch and decode 20 chunks of 8 MiB (bf16, zstd-bytegroup, most
    # threads two or more). Through malloc, each thread's arena kept its last stored chunk
    # and decoded streams (glibc's mmap threshold rises to their size after the first; an
    # arena's free top is never trimmed): 60-74 MiB left over three runs. Through
    # ``LoadScratch``: 0.6 MiB.
    code = f"""
import json, os, gc
from pathlib import Path
import torch
from safetensors.torch import save_file
from ember_weights_store import LocalBucketTier
from ember_weights_store.loader import load
from ember_weights_store.store import WeightsStore
from ember_functions.host_memory import release_free_heap

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

root = Path({str(tmp_path)!r})
model = root / "model"
model.mkdir()
(model / "config.json").write_text(json.dumps({{"architectures": ["LlamaForCausalLM"]}}))
# 160 MiB of bf16 values with 3 mantissa bits: both byte streams compress, as real
# weights' do, so each is decoded into scratch
weights = (torch.randn(40 * 2048, 1024) * 8).round().to(torch.bfloat16) / 8
save_file({{"w": weights}}, str(model / "model.safetensors"))
del weights
store = WeightsStore([LocalBucketTier(root / "bucket")])
store.import_hf_dir(model, model_id="m", chunk_size_bytes=8 << 20)
gc.collect(); release_free_heap()
before = anon_mib()
loaded = load(store, "m", threads=8, promote=False)
assert loaded.report.chunks_by_tier == {{"bucket": 20}}, loaded.report
del loaded
gc.collect(); release_free_heap()
print(round(anon_mib() - before, 1))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout) < 12, f"{done.stdout.strip()} MiB of heap left after the load"
