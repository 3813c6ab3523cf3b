"""Physical limits and peer loaders for bench/weights.py, each a function that returns seconds.

Limits say how fast the medium can go on this machine, with nothing of ours in the way:
a parallel ``pread`` of a model's files into one preallocated, already-faulted buffer (warm
from the page cache, or cold after evicting it), ``memcpy`` between two faulted buffers, and
parallel whole-object GETs from the S3 endpoint. Peers are the loaders people use today, run
on the same files: every function leaves every tensor in memory, materialized.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

PIECE_BYTES = 16 << 20  # pread request size: large requests are how a loader should read
PAGE_BYTES = 4096
RUNAI_S3_SETTINGS = {"RUNAI_STREAMER_CONCURRENCY": "1", "RUNAI_STREAMER_OBJ_CONCURRENCY": "1"}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def evict_page_cache(paths: Sequence[Path]) -> None:
    """Drops the files' pages from the page cache, so the next read comes from the disk.
    ``posix_fadvise(DONTNEED)`` drops only clean pages: flush dirty ones first."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def tree_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def parallel_pread(paths: Sequence[Path], out: torch.Tensor, *, threads: int = 8) -> float:
    """Reads every byte of ``paths`` into ``out`` (uint8, at least their total size), in
    ``PIECE_BYTES`` requests on ``threads`` threads. Returns seconds."""
    jobs = []
    base = 0
    for path in paths:
        size = path.stat().st_size
        jobs += [
            (path, off, min(PIECE_BYTES, size - off), base + off)
            for off in range(0, size, PIECE_BYTES)
        ]
        base += size
    view = memoryview(out.numpy())  # type: ignore[arg-type]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}

    def one(job: tuple[Path, int, int, int]) -> None:
        path, off, n, dst = job
        done = 0
        while done < n:
            got = os.preadv(fds[path], [view[dst + done : dst + n]], off + done)
            if got == 0:
                raise OSError(f"{path} shrank while being read")
            done += got

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, jobs))
        return time.perf_counter() - t0
    finally:
        for fd in fds.values():
            os.close(fd)


def memcpy_s(src: torch.Tensor, dst: torch.Tensor) -> float:
    t0 = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t0


def touch(tensors: dict[str, torch.Tensor]) -> int:
    """Reads one byte of every page of every tensor: a lazily mapped load does its I/O now."""
    total = 0
    for t in tensors.values():
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else t.view(torch.uint8)
        total += int(flat[::PAGE_BYTES].sum())
    return total


def safetensors_load(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        tensors.update(load_file(str(path)))
    touch(tensors)
    return tensors


def transformers_load(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.bfloat16)
    touch(dict(model.state_dict()))
    return model


def runai_load(paths: Sequence[str]) -> dict[str, torch.Tensor]:
    """runai-model-streamer's SafetensorsStreamer; ``paths`` are files or ``s3://`` URLs.
    ``owned=True`` (its default) leaves every tensor valid after the loop, like the others."""
    from runai_model_streamer import SafetensorsStreamer

    # Against moto, runai's defaults (many concurrent ranged GETs per object) fail: moto
    # takes ~0.2 s per ranged GET whatever its size, so queued requests stall until the
    # AWS CRT client drops them for missing its throughput minimum ("File access error").
    # One request at a time is the fastest setting that completes; local files keep defaults.
    s3 = any(p.startswith("s3://") for p in paths)
    saved = {k: os.environ.get(k) for k in RUNAI_S3_SETTINGS}
    if s3:
        os.environ.update(RUNAI_S3_SETTINGS)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_files(list(paths))
            for name, tensor in streamer.get_tensors():
                tensors[name] = tensor
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    touch(tensors)
    return tensors


def s3_parallel_get(client: Any, bucket: str, names: Sequence[str], *, threads: int = 8) -> int:
    """Whole-object GETs of ``names`` on ``threads`` threads; returns bytes received."""

    def one(name: str) -> int:
        return len(client.get_object(Bucket=bucket, Key=name)["Body"].read())

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(one, names))


def start_moto(port: int) -> subprocess.Popen[bytes]:
    """moto's S3 server on 127.0.0.1:``port``, in its own process (it does not share our GIL)."""
    code = (
        "import time\nfrom moto.server import ThreadedMotoServer\n"
        f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
        "time.sleep(1e9)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port} within 30 s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
