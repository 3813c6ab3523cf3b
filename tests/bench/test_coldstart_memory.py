"""bench/coldstart.py measures only the states whose host tiers fit in this machine's RAM,
and says why it skipped the others (before, the kernel killed a worker mid-run)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest

GIB = 1 << 30


@pytest.fixture(scope="module")
def states_module(bench_module: Callable[[str], ModuleType]) -> ModuleType:
    return bench_module("_coldstart_states")


ALL = ("object", "disk", "host", "prewarmed", "prewarmed_s3", "ready")


@pytest.mark.parametrize(
    ("available_gib", "kept", "skipped"),
    [
        (40, ALL, ()),  # three tiers of 11 GiB, a 4.4 GiB worker and the margin fit
        (29, tuple(s for s in ALL if s != "object"), ("object",)),  # two tiers fit
        (22, ("disk", "host", "prewarmed", "ready"), ("object", "prewarmed_s3")),  # one
        (10, ("disk", "host", "prewarmed", "ready"), ("object", "prewarmed_s3")),  # tried
    ],
)
def test_the_extra_tiers_go_first_when_ram_is_short(
    states_module: ModuleType, available_gib: int, kept: tuple[str, ...], skipped: tuple[str, ...]
) -> None:
    # The 1.1B model on an AVX2 CPU: chunks 2.2 + float32 bound 4.4 + packed 4.4 GB.
    got, why = states_module.states_that_fit(
        ALL, fill_bytes=11 * GIB, worker_bytes=int(4.4 * GIB), available_bytes=available_gib * GIB
    )
    assert got == kept
    assert tuple(why) == skipped
    for reason in why.values():
        assert "GiB of RAM" in reason and f"{available_gib:.1f} GiB available" in reason


def test_a_state_not_asked_for_needs_no_tier(states_module: ModuleType) -> None:
    # Without object, prewarmed_s3's second tier alone must fit.
    got, why = states_module.states_that_fit(
        ("prewarmed_s3", "ready"),
        fill_bytes=11 * GIB,
        worker_bytes=4 * GIB,
        available_bytes=29 * GIB,
    )
    assert got == ("prewarmed_s3", "ready") and why == {}


def test_this_machine_reports_what_it_has(states_module: ModuleType) -> None:
    assert 0 < states_module.available_bytes() < 1 << 50
