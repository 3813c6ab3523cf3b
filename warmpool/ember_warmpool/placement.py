"""Which worker takes the next request: decided here for the process manager
(``ModelPool.try_place``) and the simulator alike, so the simulator places as the pool
does.

Placement packs. Among workers running fewer than ``target`` requests it picks the
busiest (the oldest on ties), so load concentrates and idle workers really go idle and
stop after ``keepalive_s``: spreading requests to the least loaded keeps every worker a
little busy, and the pool cannot shrink until the load all but stops. When every worker
is at ``target``, the request overflows onto the least loaded one under ``cap`` (the
engine's ``max_num_seqs``), which beats waiting seconds for a cold start. Only when none
is under ``cap`` does it wait.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["place"]


def place(in_flight: Sequence[int], *, target: int, cap: int) -> int | None:
    """The index of the worker to send one request to, given each READY worker's
    requests in flight (oldest worker first); None when it must wait.

    Example::

        place([2, 0, 1], target=2, cap=8)   # -> 2: the busiest under the target
        place([2, 2], target=2, cap=8)      # -> 0: all at the target, overflow
        place([8, 8], target=2, cap=8)      # -> None: wait
    """
    room = [i for i, n in enumerate(in_flight) if n < target]
    if room:
        return max(room, key=lambda i: in_flight[i])  # max keeps the first: the oldest
    overflow = [i for i, n in enumerate(in_flight) if n < cap]
    return min(overflow, key=lambda i: in_flight[i]) if overflow else None
