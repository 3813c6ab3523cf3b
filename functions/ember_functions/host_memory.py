"""Host RAM as the kernel reports it, and whether packing may take more of it.

Packing (``Linear.pack``) gives each worker a private copy of its matrices in oneDNN's
blocked layout: the compute-dtype model's size again, per worker (SmolLM2 in bf16:
0.26 GB; the 1.1B model in float32: 4.4 GB), unless it maps the copy an earlier worker
left in the host tier (``packed_cache``), which costs it nothing of its own. A pool of
workers that each pack can pack its machine out of memory, and then the kernel's OOM
killer ends a worker mid-stream. So a worker
packs a layer only while the machine keeps ``min_free_bytes`` available afterwards, and
stops where it would not: a partly packed model runs, its other layers at ``F.linear``'s
speed. Checking before every layer, not once, bounds what workers packing at the same
moment can overshoot by to one layer each. RAM can also run short after a worker packed
(more workers started, the host tier grew): an idle worker then gives packed layers back,
one per heartbeat, last packed first, until the machine has ``min_free_bytes`` available
again, and packs them again once packing one would leave that much (``packing_action``:
between the two thresholds it holds, so a worker does not pack and unpack in turn).

"Available" is ``MemAvailable`` from ``/proc/meminfo`` (free memory plus what the kernel
can reclaim without swapping), or less under a cgroup v2 memory limit (a container):
the limit minus the cgroup's usage, its reclaimable file pages counted as free.
"""

from __future__ import annotations

import ctypes
import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

__all__ = [
    "HostMemory",
    "PackAction",
    "ProcessMemory",
    "default_min_free_bytes",
    "packing_action",
    "packing_refusal",
    "read_host_memory",
    "read_process_memory",
    "release_free_heap",
]

_GIB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class HostMemory:
    total_bytes: int
    available_bytes: int


def read_host_memory(
    *, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> HostMemory | None:
    """This process's memory as the kernel reports it; None where it reports none (not
    Linux), which lets packing go ahead unchecked.

    Example::

        mem = read_host_memory()
        if mem: print(f"{mem.available_bytes / 2**30:.1f} GiB available")
    """
    meminfo = _fields(proc / "meminfo", unit=1024)
    if "MemTotal" not in meminfo or "MemAvailable" not in meminfo:
        return None
    total, available = meminfo["MemTotal"], meminfo["MemAvailable"]
    group = _cgroup_v2_dir(proc / "self" / "cgroup", cgroup_root)
    if group is not None:
        limit = _read_int(group / "memory.max")  # None: "max", no limit
        usage = _read_int(group / "memory.current")
        if limit is not None and usage is not None:
            reclaimable = _fields(group / "memory.stat", unit=1).get("inactive_file", 0)
            total = min(total, limit)
            available = min(available, max(0, limit - usage + reclaimable))
    return HostMemory(total_bytes=total, available_bytes=available)


@dataclass(frozen=True, kw_only=True)
class ProcessMemory:
    """One process's RAM. ``private_bytes``: pages only it maps (its unique set), what
    stopping it frees: its heap, its KV cache, packed copies of its own. ``proportional_bytes``:
    its share of every page it maps, a page mapped by n processes counting 1/n (the host
    tier's weights, a zygote's pages a fork has not written), so that summed over
    processes it is the RAM they hold together. ``anonymous_bytes``: pages backed by no
    file (heap, KV cache, private packed copies, and a zygote's pages, shared or not);
    mapped host-tier files are not. ``shared_memory_bytes``: its proportional share of
    the tmpfs pages it maps (the host tier's), so that summed over processes it is the
    part of the tier they map."""

    private_bytes: int
    proportional_bytes: int
    anonymous_bytes: int
    shared_memory_bytes: int = 0


def read_process_memory(pid: int, *, proc: Path = Path("/proc")) -> ProcessMemory | None:
    """Process ``pid``'s RAM (``/proc/PID/smaps_rollup``); None where the kernel reports
    none (not Linux, the process is gone, or it is not ours to read). The kernel walks the
    process's page tables for this: ~13 ms for 2.4 GB here, so read it off any event loop
    and outside locks.

    Example::

        mem = read_process_memory(worker.proc.pid)
        if mem: print(f"{mem.private_bytes / 2**20:.0f} MiB its own")
    """
    fields = _fields(proc / str(pid) / "smaps_rollup", unit=1024)
    if "Pss" not in fields:
        return None
    private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return ProcessMemory(
        private_bytes=private,
        proportional_bytes=fields["Pss"],
        anonymous_bytes=fields.get("Anonymous", 0),
        shared_memory_bytes=fields.get("Pss_Shmem", 0),
    )


def default_min_free_bytes(total_bytes: int) -> int:
    """What packing leaves available unless told otherwise: a tenth of RAM, at least
    1 GiB (the KV caches, a request burst, the next worker's bind)."""
    return max(total_bytes // 10, _GIB)


def packing_refusal(
    need_bytes: int, memory: HostMemory | None, *, min_free_bytes: int | None = None
) -> str | None:
    """None when packing ``need_bytes`` more leaves at least ``min_free_bytes`` (default
    :func:`default_min_free_bytes`) available; otherwise why not, for the operator."""
    if memory is None or need_bytes <= 0:
        return None
    floor = _floor(memory, min_free_bytes)
    left = memory.available_bytes - need_bytes
    if left >= floor:
        return None
    return (
        f"packing {need_bytes / 2**20:.0f} MiB more would leave {max(left, 0) / _GIB:.2f} GiB "
        f"of host RAM available, under the {floor / _GIB:.2f} GiB packing keeps free; the "
        "rest stays unpacked (slower matmuls). Run fewer workers per machine, or lower "
        "the engine's pack_min_free_bytes"
    )


class PackAction(enum.Enum):
    PACK = "pack"  # pack one more layer
    UNPACK = "unpack"  # give the last packed layer's copy back
    HOLD = "hold"  # leave things as they are


def packing_action(
    *,
    next_pack_bytes: int,
    packed_units: int,
    memory: HostMemory | None,
    min_free_bytes: int | None = None,
    margin_bytes: int = 0,
) -> tuple[PackAction, str | None]:
    """What an idle worker does with its packed matrices now, and why (for the operator):
    UNPACK while less than ``min_free_bytes`` is available and something is packed; PACK
    while a layer is left to pack and packing it keeps ``min_free_bytes`` (plus
    ``margin_bytes``) available; otherwise HOLD (with the refusal, if packing was refused).
    A worker that gave layers back asks for a layer's margin before it packs again, so
    that MemAvailable's jitter cannot have it pack and give back one layer in turn.

    Example::

        action, why = packing_action(next_pack_bytes=engine.packing.next_bytes(),
                                     packed_units=engine.packing.private_units,
                                     memory=read_host_memory())
    """
    if memory is not None and packed_units > 0:
        floor = _floor(memory, min_free_bytes)
        if memory.available_bytes < floor:
            return PackAction.UNPACK, (
                f"only {memory.available_bytes / _GIB:.2f} GiB of host RAM is available, under "
                f"the {floor / _GIB:.2f} GiB packing keeps free: giving packed layers back "
                "(slower matmuls) until it is. Run fewer workers per machine, or lower the "
                "engine's pack_min_free_bytes"
            )
    if next_pack_bytes <= 0:
        return PackAction.HOLD, None
    refusal = packing_refusal(next_pack_bytes + margin_bytes, memory, min_free_bytes=min_free_bytes)
    return (PackAction.PACK, None) if refusal is None else (PackAction.HOLD, refusal)


def _floor(memory: HostMemory, min_free_bytes: int | None) -> int:
    return default_min_free_bytes(memory.total_bytes) if min_free_bytes is None else min_free_bytes


def _fields(path: Path, *, unit: int) -> dict[str, int]:
    """``name value`` or ``name: value [kB]`` lines as integers (bytes with ``unit``)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.replace(":", " ", 1).partition(" ")
        value = rest.split()
        if value and value[0].isdigit():
            out[name] = int(value[0]) * unit
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_v2_dir(self_cgroup: Path, root: Path) -> Path | None:
    """This process's cgroup v2 directory (the ``0::/path`` line), if it has one."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            group = root / line[3:].lstrip("/")
            return group if (group / "memory.max").exists() else None
    return None


def release_free_heap() -> None:
    """Gives the free pages of this process's C heap back to the kernel (glibc's
    ``malloc_trim``; nothing where another allocator runs). glibc keeps freed blocks in
    its arenas for reuse, one arena per thread that allocated: what oneDNN's threads freed
    of a packed copy, or what parsing left in a zygote, stays the process's RAM without
    this. Callers say what it gave back where they measured it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return cast("Callable[[int], int]", ctypes.CDLL(None).malloc_trim)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        return None
