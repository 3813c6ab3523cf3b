"""``WeightsStore.readahead``: a new worker reads its chunks while torch still imports.

Residency is read from the kernel (``mincore``), so these tests see what the loader will
find: pages in the page cache, or not.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ember_weights_store import DiskTier, LocalBucketTier
from ember_weights_store.keys import key_to_path
from ember_weights_store.loader import load
from ember_weights_store.store import WeightsStore

CHUNK = 64 * 1024
# Read pages are clean cache: the kernel may reclaim a few before we look (CI once found
# 5118 of 5120). WILLNEED alone leaves half of a file or more unread, so this still
# tells reading all of it from not.
ALL_READ = 0.99
_LIBC = ctypes.CDLL(None, use_errno=True)


def _resident_fraction(paths: list[Path]) -> float:
    """Of these files' pages, the share in the page cache."""
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        with path.open("rb") as f:
            # A private writable mapping exposes an address without touching a page.
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            try:
                pages = -(-size // mmap.PAGESIZE)
                vec = (ctypes.c_ubyte * pages)()
                anchor = ctypes.c_char.from_buffer(mm)
                try:
                    addr = ctypes.addressof(anchor)
                    if _LIBC.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                        raise OSError(ctypes.get_errno(), "mincore failed")
                finally:
                    del anchor
                resident += sum(v & 1 for v in vec)
                total += pages
            finally:
                mm.close()
    return resident / total if total else 1.0


def _evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # DONTNEED drops clean pages only
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture
def filled(tiny_model: Callable[..., Path], tmp_path: Path) -> tuple[WeightsStore, DiskTier]:
    """A tiny model in a bucket and, after one load, in the disk tier too."""
    bucket = LocalBucketTier(tmp_path / "bucket")
    disk = DiskTier(tmp_path / "disk", budget_bytes=64 << 20)
    store = WeightsStore([disk, bucket])
    store.import_hf_dir(tiny_model("llama"), model_id="acme/tiny", chunk_size_bytes=CHUNK)
    load(store, "acme/tiny").wait_promoted()
    return store, disk


def test_readahead_brings_the_disk_tier_copy_into_the_page_cache(
    filled: tuple[WeightsStore, DiskTier], tmp_path: Path
) -> None:
    store, disk = filled
    manifest = store.manifest("acme/tiny")
    chunk_files = [disk.root / key_to_path(c.hash) for c in manifest.chunks]
    bucket_files = [tmp_path / "bucket" / key_to_path(c.hash) for c in manifest.chunks]
    _evict(chunk_files + bucket_files)
    if _resident_fraction(chunk_files) > 0.5:
        pytest.skip("this filesystem keeps pages after POSIX_FADV_DONTNEED")

    ahead = store.readahead("acme/tiny")

    assert ahead.bytes_read == sum(c.raw_size for c in manifest.chunks)
    deadline = time.monotonic() + 10
    while _resident_fraction(chunk_files) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _resident_fraction(chunk_files) >= ALL_READ
    # Only the copy the loader will read is warmed, not the bucket's as well.
    assert _resident_fraction(bucket_files) < 0.5


def test_readahead_reads_all_of_an_object_larger_than_any_readahead_window(
    tmp_path: Path,
) -> None:
    # posix_fadvise(WILLNEED) reads one window per call (the device's read_ahead_kb or
    # its largest I/O, 128 KiB to 8 MiB), which left half of a 16 MiB chunk on disk.
    disk = DiskTier(tmp_path / "disk", budget_bytes=64 << 20)
    blob = os.urandom(1 << 20) * 24  # 24 MiB
    disk.put("sha256:" + "ab" * 32, blob)
    path = disk.root / key_to_path("sha256:" + "ab" * 32)
    _evict([path])
    if _resident_fraction([path]) > 0.5:
        pytest.skip("this filesystem keeps pages after POSIX_FADV_DONTNEED")
    copy = disk.readahead("sha256:" + "ab" * 32)
    assert copy is not None and copy.size_bytes == len(blob)
    assert _resident_fraction([path]) >= ALL_READ  # all of it, once readahead returns


def test_without_populate_the_file_is_read_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ember_weights_store import page_cache

    monkeypatch.setattr(page_cache, "_libc", None)  # a kernel or OS without it
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(1 << 20) * 20)
    _evict([path])
    if _resident_fraction([path]) > 0.5:
        pytest.skip("this filesystem keeps pages after POSIX_FADV_DONTNEED")
    fd = os.open(path, os.O_RDONLY)
    try:
        page_cache.read_into_page_cache(fd, 20 << 20)
    finally:
        os.close(fd)
    assert _resident_fraction([path]) >= ALL_READ


def test_readahead_never_asks_a_remote_tier_about_chunks(
    filled: tuple[WeightsStore, DiskTier], tmp_path: Path
) -> None:
    store, disk = filled

    class Remote:
        """The origin as an object store: every ``has`` would be a request."""

        name = "remote"
        holds_decoded = False

        def __init__(self, inner: LocalBucketTier) -> None:
            self.inner = inner
            self.asked: list[str] = []

        def __getattr__(self, attr: str) -> object:
            return getattr(self.inner, attr)

        def has(self, key: str) -> bool:
            self.asked.append(key)
            return self.inner.has(key)

        def get(self, key: str) -> bytes:
            return self.inner.get(key)

    remote = Remote(LocalBucketTier(tmp_path / "bucket"))
    manifest = store.manifest("acme/tiny")
    remote_store = WeightsStore([disk, remote])  # type: ignore[list-item]
    ahead = remote_store.readahead("acme/tiny")
    assert ahead.bytes_read == sum(c.raw_size for c in manifest.chunks)
    assert not {c.hash for c in manifest.chunks} & set(remote.asked)


def test_the_readahead_path_imports_no_torch(
    filled: tuple[WeightsStore, DiskTier], tmp_path: Path, python_json: Callable[[str], Any]
) -> None:
    """What a worker runs on its readahead thread while its main thread imports torch:
    were torch imported here, the two would only take turns."""
    code = f"""
import json, sys
from pathlib import Path
from ember_weights_store import DiskTier, LocalBucketTier
from ember_weights_store.keys import key_to_path
from ember_weights_store.store import WeightsStore
from ember_functions.loading import StoreConfig

StoreConfig()  # the worker parses its store settings on this thread too
store = WeightsStore([
    DiskTier(Path({str(tmp_path / "disk")!r}), budget_bytes=64 << 20),
    LocalBucketTier(Path({str(tmp_path / "bucket")!r})),
])
ahead = store.readahead("acme/tiny")
print(json.dumps({{"asked": ahead.bytes_read, "torch": "torch" in sys.modules}}))
"""
    result = python_json(code)
    assert result["asked"] > 0
    assert result["torch"] is False
