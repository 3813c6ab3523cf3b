"""Admission to a pool: arrivals and waiting requests counted, a full queue refused."""

from __future__ import annotations

import threading

import pytest

from ember_core import RateLimitError
from ember_warmpool.admission import Admission


def make(max_queue: int = 2, cond: threading.Condition | None = None) -> Admission:
    return Admission(
        "m",
        cond=cond or threading.Condition(),
        max_queue=max_queue,
        retry_after_s=0.5,
        clock=lambda: 42.0,
    )


def test_arrivals_are_counted_until_taken() -> None:
    admission = make()
    assert admission.admit() == 42.0
    admission.admit()
    assert admission.take_arrivals() == 2
    assert admission.take_arrivals() == 0


def test_a_full_queue_refuses_with_a_retry_after_and_still_counts_the_arrival() -> None:
    admission = make(max_queue=1)
    with admission.waiting():
        assert admission.queued == 1
        with pytest.raises(RateLimitError, match="1 requests already wait for a m worker") as e:
            admission.admit()
        assert e.value.retry_after_s == 1.0  # never less than a second
    assert admission.queued == 0
    admission.admit()  # room again
    assert admission.take_arrivals() == 2  # the refused one arrived too: demand


def test_starting_to_wait_wakes_the_policy() -> None:
    cond = threading.Condition()
    admission = make(cond=cond)
    woken = threading.Event()

    def tick_thread() -> None:
        with cond:
            if cond.wait_for(lambda: admission.queued > 0, timeout=10):
                woken.set()

    thread = threading.Thread(target=tick_thread)
    thread.start()
    with admission.waiting():
        thread.join(timeout=10)
    assert woken.is_set()
