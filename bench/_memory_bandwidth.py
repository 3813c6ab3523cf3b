"""This machine's figures for the benches: memory read bandwidth, CPU, other jobs' load.

Memory read bandwidth is the roofline for batch-1 decoding, which reads every weight
once per token and does ~2 flops per weight: it is bound by how fast the cores can
stream memory, not by their arithmetic. A sum-reduce over a tensor far larger than
the last-level cache streams memory the same way, with the same threads, so it is a
fair ceiling for the engine.

Run alone: ``python bench/_memory_bandwidth.py [--threads 2] [--gib 1]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch


def measure_read_gbps(*, threads: int = 2, size_bytes: int = 1 << 30, repeats: int = 7) -> float:
    """Best read bandwidth over ``repeats`` sums of a ``size_bytes`` float32 tensor, GB/s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # ones() rather than empty(): untouched pages would read as the shared zero
        # page, which never leaves the cache and would flatter the figure.
        data = torch.ones(size_bytes // 4, dtype=torch.float32)
        data.sum()  # faults in page tables and wakes the thread pool outside the timing
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - t0)
        # Best rather than median: interference from other tenants only ever slows
        # a read down, so the fastest pass is closest to what the hardware can do.
        return data.numel() * data.element_size() / best / 1e9
    finally:
        torch.set_num_threads(previous)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (steal included) since boot."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the peers and their workers)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def wait_for_quiet(label: str, max_wait_s: float = 60.0, threshold: float = 0.3) -> float:
    """Holds a system's start while other jobs on this shared machine use the cores.

    The load average lags by a minute and counts our own previous system, so this
    samples /proc/stat directly; after ``max_wait_s`` it goes ahead anyway.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = machine_busy_s()
        time.sleep(2.0)
        busy = (machine_busy_s() - b0) / 2.0
        if busy <= threshold or time.monotonic() > deadline:
            return busy
        print(f"  other jobs use {busy:.1f} cores; waiting before {label} ...", flush=True)


def machine_info(threads: int) -> dict[str, Any]:
    names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    return dict(
        cpu=names[0].split(":", 1)[1].strip() if names else platform.processor(),
        cores=os.cpu_count(), threads=threads, torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        python=platform.python_version(), loadavg_at_start=list(os.getloadavg()),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    gbps = measure_read_gbps(threads=args.threads, size_bytes=int(args.gib * (1 << 30)))
    print(f"memory read bandwidth: {gbps:.1f} GB/s ({args.threads} threads)")


if __name__ == "__main__":
    main()
