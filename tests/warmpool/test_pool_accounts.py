"""A pool's accounts: every worker's lifetime counts from the start of its start, and a
request is cold when its worker became READY after it arrived."""

from __future__ import annotations

import pytest

from ember_warmpool.pool_accounts import PoolAccounts


def test_worker_seconds_count_starting_serving_and_gone_workers() -> None:
    accounts = PoolAccounts()
    accounts.born("a", now_s=0.0)
    accounts.born("b", now_s=4.0)
    accounts.retire("a", now_s=10.0)
    accounts.retire("a", now_s=20.0)  # twice: counted once
    stats = accounts.stats(now_s=12.0)
    assert stats["worker_s"] == pytest.approx(10.0 + 8.0)  # a gone, b alive since 4
    assert stats["starts"] == 2.0 and accounts.live() == ["b"]


def test_a_request_is_cold_when_its_worker_became_ready_after_it_arrived() -> None:
    accounts = PoolAccounts()
    accounts.born("w", now_s=0.0)
    accounts.placed("w", arrived_s=0.5)  # not READY yet when placed: never marked ready
    accounts.ready("w", now_s=2.0)
    accounts.placed("w", arrived_s=1.0)  # waited on the start
    accounts.placed("w", arrived_s=3.0)  # found it READY
    accounts.parked("w")
    accounts.placed("w", arrived_s=0.0)  # parked: no READY time to have waited on
    accounts.ready("w", now_s=9.0)  # promoted
    accounts.placed("w", arrived_s=8.0)  # waited on the promotion
    stats = accounts.stats(now_s=10.0)
    assert stats["requests"] == 5.0 and stats["cold_requests"] == 2.0
