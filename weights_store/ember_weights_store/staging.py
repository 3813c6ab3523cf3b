"""Loading straight onto an accelerator: a ring of pinned host slots between the tiers and the
device, so reading chunk N+1 overlaps the device copy of chunk N.

A GPU copies from host memory at full speed only from page-locked (pinned) memory, and only a
copy from pinned memory can be asynchronous. Pinning a whole model's worth of host memory would
cost seconds and double the host footprint, so the loader pins a few chunk-sized slots instead:

    acquire a slot -> read/decode the chunk into it -> verify -> enqueue an async copy into
    the device buffer -> hand the slot back with the copy's completion event

and whoever acquires that slot next waits for the event first. Host memory in flight is
``slots * chunk_size`` whatever the model's size.

The ring's logic (slot accounting, waiting on pending copies, every chunk copied once) is plain
Python over a ``CopyEngine``: on CUDA, copies run on a side stream and completion is a CUDA
event; on CPU, ``SyncCopyEngine`` copies at once, which lets the tests run the same ring here.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch

from ember_core import InvalidRequestError

__all__ = ["CopyEngine", "CudaCopyEngine", "StagingRing", "SyncCopyEngine", "copy_engine_for"]


class CopyEngine(Protocol):
    """Starts host->device copies and says when each has finished."""

    def start(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        """Begin copying ``src`` (host, pinned) into ``dst`` (device); return a handle."""
        ...

    def wait(self, handle: Any) -> None:
        """Block until the copy behind ``handle`` has finished reading ``src``."""
        ...


class SyncCopyEngine:
    """Copies synchronously: the handle is already complete. The CPU path, and the tests'."""

    def start(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        dst.copy_(src)
        return None

    def wait(self, handle: Any) -> None:
        return None


class CudaCopyEngine:
    """Async copies on one side stream, so they overlap the compute stream and the reads."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device=device)

    def start(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)  # async only because src is pinned
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def wait(self, handle: Any) -> None:
        handle.synchronize()


def copy_engine_for(device: torch.device) -> CopyEngine:
    return CudaCopyEngine(device) if device.type == "cuda" else SyncCopyEngine()


class StagingRing:
    """``slots`` host buffers of ``slot_bytes``; thread-safe. See the module docstring."""

    def __init__(
        self, *, slots: int, slot_bytes: int, engine: CopyEngine, pin: bool = False
    ) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise InvalidRequestError(f"staging slots must be a positive integer, got {slots!r}")
        self.engine = engine
        self._slots = [
            torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(slots)
        ]
        self._free: list[tuple[int, Any]] = [(i, None) for i in range(slots)]  # (slot, pending)
        self._cond = threading.Condition()
        self._in_use = 0
        self.max_in_use = 0
        self.copies = 0

    def acquire(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """A free slot and a ``[nbytes]`` view of it, once any copy still reading it is done."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            index, pending = self._free.pop()
            self._in_use += 1
            self.max_in_use = max(self.max_in_use, self._in_use)
        if pending is not None:
            self.engine.wait(pending)
        return index, self._slots[index][:nbytes]

    def submit(self, index: int, dst: torch.Tensor) -> None:
        """Start copying the slot's first ``dst.numel()`` bytes into ``dst``; free the slot."""
        handle = self.engine.start(dst, self._slots[index][: dst.numel()])
        with self._cond:
            self.copies += 1
            self._in_use -= 1
            self._free.append((index, handle))
            self._cond.notify()

    def finish(self) -> None:
        """Wait for every copy started so far."""
        with self._cond:
            pending = [h for _, h in self._free if h is not None]
        for handle in pending:
            self.engine.wait(handle)
