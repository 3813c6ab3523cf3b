"""Host RAM from /proc (and a cgroup v2 limit), the packing decision made on it, and one
process's RAM (private and proportional) as ``ember pool status`` shows it; and the
free C heap given back to the kernel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ember_functions.host_memory import (
    HostMemory,
    PackAction,
    default_min_free_bytes,
    packing_action,
    packing_refusal,
    read_host_memory,
    read_process_memory,
)

GIB = 1 << 30


def fake_proc(tmp_path: Path, *, total_kb: int, available_kb: int, cgroup: str = "0::/\n") -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       {total_kb} kB\nMemFree:         1000 kB\n"
        f"MemAvailable:   {available_kb} kB\nBuffers:           10 kB\n"
    )
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc


def test_reads_total_and_available_from_meminfo(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, total_kb=16 * 1024 * 1024, available_kb=9 * 1024 * 1024)
    memory = read_host_memory(proc=proc, cgroup_root=tmp_path / "no-cgroup")
    assert memory == HostMemory(total_bytes=16 * GIB, available_bytes=9 * GIB)


def test_a_cgroup_v2_limit_caps_total_and_available(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path, total_kb=64 * 1024 * 1024, available_kb=60 * 1024 * 1024, cgroup="0::/pod/w1\n"
    )
    group = tmp_path / "cgroup" / "pod" / "w1"
    group.mkdir(parents=True)
    (group / "memory.max").write_text(f"{8 * GIB}\n")
    (group / "memory.current").write_text(f"{7 * GIB}\n")
    # Page cache the kernel can drop counts as available inside the limit too.
    (group / "memory.stat").write_text(f"anon 123\ninactive_file {GIB // 2}\nactive_file 5\n")
    memory = read_host_memory(proc=proc, cgroup_root=tmp_path / "cgroup")
    assert memory == HostMemory(total_bytes=8 * GIB, available_bytes=GIB + GIB // 2)


def test_an_unlimited_cgroup_leaves_meminfo_as_it_is(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path, total_kb=4 * 1024 * 1024, available_kb=3 * 1024 * 1024, cgroup="0::/w\n"
    )
    group = tmp_path / "cgroup" / "w"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("max\n")
    (group / "memory.current").write_text(f"{GIB}\n")
    memory = read_host_memory(proc=proc, cgroup_root=tmp_path / "cgroup")
    assert memory == HostMemory(total_bytes=4 * GIB, available_bytes=3 * GIB)


def test_no_meminfo_means_no_reading(tmp_path: Path) -> None:
    assert read_host_memory(proc=tmp_path / "nothing", cgroup_root=tmp_path) is None


def test_this_machine_reports_something_plausible() -> None:
    memory = read_host_memory()
    if memory is None:
        pytest.skip("no /proc/meminfo here")
    assert 0 < memory.available_bytes <= memory.total_bytes


def test_a_process_memory_is_its_private_pages_and_its_share_of_the_rest(
    tmp_path: Path,
) -> None:
    (tmp_path / "41").mkdir()
    (tmp_path / "41" / "smaps_rollup").write_text(
        "55e13e2c4000-7fff2268e000 ---p 00000000 00:00 0                          [rollup]\n"
        "Rss:                9000 kB\nPss:                5000 kB\n"
        "Shared_Clean:       6000 kB\nShared_Dirty:          0 kB\n"
        "Private_Clean:       200 kB\nPrivate_Dirty:       2800 kB\n"
        "Anonymous:          2900 kB\n"
    )
    memory = read_process_memory(41, proc=tmp_path)
    assert memory is not None
    assert memory.private_bytes == 3000 * 1024 and memory.proportional_bytes == 5000 * 1024
    assert memory.anonymous_bytes == 2900 * 1024
    assert read_process_memory(42, proc=tmp_path) is None  # gone, or not Linux


def test_this_process_holds_what_it_allocates_privately() -> None:
    import os

    before = read_process_memory(os.getpid())
    if before is None:
        pytest.skip("no /proc/PID/smaps_rollup here")
    block = bytearray(64 << 20)  # written (zeroed) by the allocator: 64 MiB of its own
    after = read_process_memory(os.getpid())
    assert after is not None and after.private_bytes - before.private_bytes > 60 << 20
    assert after.proportional_bytes >= after.private_bytes
    del block


def test_packing_goes_ahead_while_enough_stays_available() -> None:
    memory = HostMemory(total_bytes=24 * GIB, available_bytes=10 * GIB)
    assert default_min_free_bytes(memory.total_bytes) == 24 * GIB // 10
    assert packing_refusal(5 * GIB, memory) is None  # 5 GiB left >= 2.4 GiB
    assert packing_refusal(5 * GIB, memory, min_free_bytes=5 * GIB) is None
    assert packing_refusal(0, HostMemory(total_bytes=GIB, available_bytes=0)) is None
    assert packing_refusal(GIB, None) is None  # nothing reported: nothing to go by


def test_packing_stops_where_it_would_eat_the_reserve_and_says_what_to_do() -> None:
    memory = HostMemory(total_bytes=24 * GIB, available_bytes=3 * GIB)
    refusal = packing_refusal(GIB, memory)  # 2 GiB left < 2.4 GiB kept free
    assert refusal is not None
    assert "1024 MiB" in refusal and "2.40 GiB" in refusal
    assert "pack_min_free_bytes" in refusal and "fewer workers" in refusal
    assert packing_refusal(GIB, memory, min_free_bytes=GIB) is None
    # A small machine still keeps 1 GiB free.
    assert packing_refusal(GIB, HostMemory(total_bytes=4 * GIB, available_bytes=GIB + GIB // 2))


def test_an_idle_worker_packs_holds_or_gives_back_as_host_ram_allows() -> None:
    def action(available_gib: float, *, next_bytes: int = GIB, packed: int = 3) -> PackAction:
        memory = HostMemory(total_bytes=24 * GIB, available_bytes=int(available_gib * GIB))
        return packing_action(
            next_pack_bytes=next_bytes, packed_units=packed, memory=memory, min_free_bytes=4 * GIB
        )[0]

    assert action(6.0) is PackAction.PACK  # 5 GiB left after packing >= 4
    assert action(4.5) is PackAction.HOLD  # packing would leave 3.5: between the thresholds
    assert action(3.9) is PackAction.UNPACK  # under the floor with layers packed
    assert action(3.9, packed=0) is PackAction.HOLD  # nothing left to give back
    assert action(9.0, next_bytes=0) is PackAction.HOLD  # everything packed
    assert packing_action(next_pack_bytes=GIB, packed_units=3, memory=None) == (
        PackAction.PACK,
        None,
    )
    _, why = packing_action(
        next_pack_bytes=GIB,
        packed_units=3,
        memory=HostMemory(total_bytes=24 * GIB, available_bytes=GIB),
        min_free_bytes=4 * GIB,
    )
    assert why is not None and "1.00 GiB" in why and "giving packed layers back" in why


def test_free_heap_pages_go_back_to_the_kernel() -> None:
    # What the zygote does before it forks, so that a child's first mallocs fault in fresh
    # pages instead of copying the zygote's. Every other 64 KiB block freed, the last
    # kept: glibc cannot shrink the heap from its top, so only malloc_trim returns the
    # free blocks' pages.
    code = """
import os
from ember_functions.host_memory import release_free_heap

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

blocks = [b"x" * (64 << 10) for _ in range(2048)]      # 128 MiB, touched
del blocks[::2]                                         # 64 MiB of free chunks
before = rss_bytes()
release_free_heap()
print((before - rss_bytes()) >> 20)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 48, f"only {done.stdout.strip()} MiB of 64 MiB freed went back"
