"""The pinned staging ring between the tiers and a device, tested on the CPU: a copy engine
that completes copies late (as a GPU does) must never see its slot reused too early, every
chunk is copied once, and host memory in flight stays within the slots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ember_weights_store import DiskTier, LocalBucketTier
from ember_weights_store.loader import load
from ember_weights_store.staging import StagingRing
from ember_weights_store.store import WeightsStore


class LateCopyEngine:
    """Like a GPU stream: ``start`` only enqueues; the bytes are read from the slot when the
    copy is waited for. A ring that reused a slot before waiting would copy the wrong bytes."""

    def __init__(self) -> None:
        self.started = 0
        self.completed = 0

    def start(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        self.started += 1
        return [dst, src, False]

    def wait(self, handle: Any) -> None:
        dst, src, done = handle
        if not done:
            dst.copy_(src)
            handle[2] = True
            self.completed += 1


def test_ring_waits_for_a_slots_copy_before_reusing_it() -> None:
    engine = LateCopyEngine()
    ring = StagingRing(slots=2, slot_bytes=16, engine=engine)
    device = torch.zeros(10, 16, dtype=torch.uint8)
    for n in range(10):
        slot, view = ring.acquire(16)
        view.fill_(n + 1)  # only safe if the previous copy out of this slot has finished
        ring.submit(slot, device[n])
    ring.finish()
    assert engine.started == engine.completed == 10 == ring.copies
    assert ring.max_in_use == 1
    assert torch.equal(device, torch.arange(1, 11, dtype=torch.uint8)[:, None].expand(10, 16))


def test_staged_load_gives_the_same_tensors_within_its_slots(
    tiny_model: Any, tmp_path: Path
) -> None:
    model_dir = tiny_model("llama")
    bucket = LocalBucketTier(tmp_path / "bucket")
    disk = DiskTier(tmp_path / "disk", budget_bytes=64 << 20)
    store = WeightsStore([disk, bucket])
    store.import_hf_dir(model_dir, model_id="tiny", chunk_size_bytes=16 * 1024)
    loaded = load(store, "tiny", staging_slots=2, threads=4)
    n = len(loaded.manifest.chunks)
    assert loaded.report.staged_copies == n and 1 <= loaded.report.staging_slots_peak <= 2
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        assert torch.equal(loaded.tensors[name], t), name
    # The slot is reused once its copy is done, so promotion happened during the load.
    assert len(disk.keys()) == n
    again = load(store, "tiny", staging_slots=3)
    assert again.report.chunks_by_tier == {"disk": n}
