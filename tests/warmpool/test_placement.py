"""Placement, as the pool and the simulator share it: pack onto the busiest worker under
the target, overflow onto the least loaded under the engine's cap, else wait."""

from __future__ import annotations

from ember_warmpool.placement import place


def test_the_busiest_worker_under_the_target_takes_it_the_oldest_on_ties() -> None:
    assert place([2, 0, 1], target=2, cap=8) == 2
    assert place([1, 1, 0], target=2, cap=8) == 0
    assert place([0, 0], target=2, cap=8) == 0


def test_with_every_worker_at_the_target_it_overflows_onto_the_least_loaded() -> None:
    assert place([3, 2, 4], target=2, cap=8) == 1
    assert place([2, 2], target=2, cap=8) == 0


def test_it_waits_when_every_worker_is_at_the_cap_or_there_is_none() -> None:
    assert place([8, 8], target=2, cap=8) is None
    assert place([2, 2], target=2, cap=2) is None  # no overflow: the cap is the target
    assert place([], target=2, cap=8) is None
