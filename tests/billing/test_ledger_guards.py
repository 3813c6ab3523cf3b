"""What the database itself refuses, whatever the code above it does: editing the
ledger, and a second event or entry for the same request."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from ember_billing import BillingConfig, BillingService, ReserveRequest, Usage
from ember_billing.sweeper import Sweeper

from .conftest import Clock


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE postings SET amount_micros = 0",
        "DELETE FROM postings",
        "UPDATE usage_events SET cost_micros = 0",
        "DELETE FROM journal_entries",
    ],
)
def test_ledger_tables_are_append_only(
    svc: BillingService, world: dict[str, str], sql: str
) -> None:
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 10, 10)
    svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=10))
    before = svc.ledger_totals()
    with pytest.raises(DBAPIError, match="append-only"), svc._session() as s:
        s.execute(text(sql))
    assert svc.ledger_totals() == before


def test_second_usage_event_for_a_request_is_refused_by_the_database(
    svc: BillingService, world: dict[str, str]
) -> None:
    """Usage is journaled per batch, so the per-request guard is UNIQUE(request_id) on
    usage_events; settlement inserts there without ON CONFLICT, so a second event can
    only fail its transaction. Reversals keep a per-request ref."""
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 10, 10, request_id="once")
    svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=10))
    with pytest.raises(IntegrityError), svc._session() as s:
        s.execute(
            text(
                "INSERT INTO usage_events (request_id, reservation_id, journal_id, tenant_id, "
                "key_id, model, adapter, price_id, prompt_tokens, cached_tokens, "
                "completion_tokens, cost_micros, occurred_at, period, day) VALUES ('once', "
                "'r', 'j', 't', 'k', 'm1', '', 1, 10, 0, 10, 30, CURRENT_TIMESTAMP, "
                "'2026-12', '2026-12-10')"
            )
        )
    svc.reverse_usage("once", reason="test")
    with pytest.raises(IntegrityError), svc._session() as s:
        s.execute(
            text(
                "INSERT INTO journal_entries (id, ref, kind, tenant_id, period, memo, "
                "created_at) VALUES ('x', 'reversal:usage:once', 'reversal', 't', '2026-12', "
                "'', CURRENT_TIMESTAMP)"
            )
        )


def test_concurrent_settles_of_one_request_bill_it_once(db_url: str, clock: Clock) -> None:
    svc = BillingService(db_url, clock=clock, config=BillingConfig(pool_size=16))
    try:
        t = svc.create_tenant("race")
        _, key = svc.create_key("race")
        svc.set_price("m", input_micros=1_000_000, cached_input_micros=0, output_micros=0)
        reservations = svc.reserve_many(
            [ReserveRequest(t.id, key.id, "m", "", 100, 0) for _ in range(20)]
        )
        results: list[int] = []
        barrier = threading.Barrier(8)

        def settle_all(fn: Callable[[], list[int]]) -> None:
            barrier.wait()
            results.extend(fn())

        def one_by_one() -> list[int]:
            return [
                svc.settle(r.id, Usage(prompt_tokens=100, completion_tokens=0)).cost_micros
                for r in reservations
            ]

        def batched() -> list[int]:
            items = [(r.id, Usage(prompt_tokens=100, completion_tokens=0)) for r in reservations]
            return [x.cost_micros for x in svc.settle_many(items)]

        # 8 threads deliver the same 20 settlements at once, singly and in batches.
        jobs = [one_by_one, batched] * 4
        threads = [threading.Thread(target=settle_all, args=(j,)) for j in jobs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(results) == 8 * 20 and set(results) == {100}
        assert svc.ledger_totals()[f"tenant:{t.id}:receivable"] == 20 * 100
        assert svc.check_ledger() == []
    finally:
        svc.close()


def test_sweeper_thread_releases_expired_holds(
    svc: BillingService, world: dict[str, str], clock: Clock
) -> None:
    svc.set_quota(world["tenant"], spend_cap_micros=3000)
    svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 1000)
    clock.advance(seconds=svc.config.reservation_ttl_s + 1)
    sweeper = Sweeper(svc, interval_s=0.05, batch=1).start()
    try:
        for _ in range(100):
            try:
                svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 1000)
                break
            except Exception:
                threading.Event().wait(0.05)
        else:
            pytest.fail("the sweeper never released the expired hold")
    finally:
        sweeper.stop()
