"""Usage is journaled once per tenant and settled batch, while every request keeps
its own usage event: the entries balance, each charges exactly the sum of its
events, a reversal gives back exactly one request's cost, and check_ledger notices
an event the entry does not account for."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from ember_billing import BillingService, ReserveRequest, Usage, bulk
from ember_billing.models import JournalEntry, Posting, UsageEvent
from ember_core.errors import ConflictError


def _two_tenants(svc: BillingService) -> list[tuple[str, str]]:
    svc.set_price("m", input_micros=1_000_000, cached_input_micros=250_000, output_micros=3)
    out = []
    for name in ("a", "b"):
        t = svc.create_tenant(name)
        _, key = svc.create_key(name)
        out.append((t.id, key.id))
    return out


def test_one_entry_per_tenant_and_batch_charging_its_events(svc: BillingService) -> None:
    scopes = _two_tenants(svc)
    reqs = [ReserveRequest(*scopes[i % 2], "m", "", 100 + i, 50) for i in range(30)]
    reservations = svc.reserve_many(reqs)
    items = [
        (r, Usage(prompt_tokens=r.prompt_tokens, completion_tokens=i, cached_tokens=i))
        for i, r in enumerate(reservations)
    ]
    results = svc.settle_many(items + items[:5])  # duplicates in the same batch too
    assert [x.duplicate for x in results] == [False] * 30 + [True] * 5
    assert results[30:] == [dataclasses.replace(x, duplicate=True) for x in results[:5]]
    with svc._session() as s:
        entries = s.scalars(select(JournalEntry).where(JournalEntry.kind == "usage")).all()
        assert sorted(e.tenant_id for e in entries) == sorted(t for t, _ in scopes)
        for e in entries:
            legs = dict(
                s.execute(
                    select(Posting.account, Posting.amount_micros).where(Posting.journal_id == e.id)
                ).all()
            )
            cost, n = s.execute(
                select(func.sum(UsageEvent.cost_micros), func.count()).where(
                    UsageEvent.journal_id == e.id
                )
            ).one()
            assert legs == {f"tenant:{e.tenant_id}:receivable": cost, "revenue": -cost}
            assert n == 15 and e.memo == "usage of 15 requests"
        per_request = dict(s.execute(select(UsageEvent.request_id, UsageEvent.cost_micros)).all())
    assert per_request == {x.request_id: x.cost_micros for x in results[:30]}
    assert svc.check_ledger() == []
    totals = svc.ledger_totals()
    for tenant, _ in scopes:
        mine = sum(x.cost_micros for x, r in zip(results[:30], reservations, strict=True)
                   if r.tenant_id == tenant)  # fmt: skip
        assert totals[f"tenant:{tenant}:receivable"] == mine
        assert svc.invoice(tenant).total_micros == mine


def test_reversing_one_request_of_a_batch_gives_back_its_cost_only(
    svc: BillingService,
) -> None:
    [(tenant, key)] = _two_tenants(svc)[:1]
    svc.set_quota(tenant, spend_cap_micros=10**9)
    rs = svc.reserve_many([ReserveRequest(tenant, key, "m", "", 1000, 0) for _ in range(3)])
    results = svc.settle_many([(r, Usage(prompt_tokens=1000 - i, completion_tokens=0))
                               for i, r in enumerate(rs)])  # fmt: skip
    owed = sum(x.cost_micros for x in results)
    svc.reverse_usage(results[1].request_id, reason="outage")
    assert svc.ledger_totals()[f"tenant:{tenant}:receivable"] == owed - results[1].cost_micros
    with pytest.raises(ConflictError, match="already reversed"):
        svc.reverse_usage(results[1].request_id, reason="outage")
    assert svc.check_ledger() == []
    inv = svc.invoice(tenant)
    assert inv.total_micros == owed - results[1].cost_micros
    assert [ln.amount_micros for ln in inv.lines if ln.description.startswith("reversal")] == [
        -results[1].cost_micros
    ]


def test_check_ledger_finds_events_their_entry_does_not_charge(
    svc: BillingService,
) -> None:
    [(tenant, key)] = _two_tenants(svc)[:1]
    r = svc.reserve(tenant, key, "m", "", 10, 0)
    svc.settle(r, Usage(prompt_tokens=10, completion_tokens=0))
    with svc._session() as s:
        jid = s.scalars(select(UsageEvent.journal_id)).one()
        for rid, journal in (("smuggled", jid), ("stray", "no-such-entry")):
            s.execute(
                text(
                    "INSERT INTO usage_events (request_id, reservation_id, journal_id, "
                    "tenant_id, key_id, model, adapter, price_id, prompt_tokens, "
                    "cached_tokens, completion_tokens, cost_micros, occurred_at, period, day) "
                    "VALUES (:rid, 'r', :j, :t, :k, 'm', '', 1, 5, 0, 0, 5, "
                    "CURRENT_TIMESTAMP, '2026-12', '2026-12-10')"
                ),
                {"rid": rid, "j": journal, "t": tenant, "k": key},
            )
    problems = svc.check_ledger()
    assert any(f"usage entry {jid} charges 10 but its 2 events cost 15" in p for p in problems)
    assert any("point at no-such-entry, which is not a usage entry" in p for p in problems)


def test_driver_errors_surface_as_sqlalchemy_errors_and_roll_back(
    svc: BillingService,
) -> None:
    [(tenant, key)] = _two_tenants(svc)[:1]
    r = svc.reserve(tenant, key, "m", "", 10, 0, request_id="dup")
    row = (r.id, "dup2", tenant, key, "m", "", 1, 10, 0, 10, None, None, "open")
    with pytest.raises(IntegrityError), svc._session() as s:
        drv = bulk.Driver(s)
        at = drv.ts(svc.clock())
        bulk.insert_reservations(drv, [(*row, at, at)])  # same primary key
    assert svc.settle(r, Usage(prompt_tokens=10, completion_tokens=0)).cost_micros == 10
    assert svc.check_ledger() == []


def test_settlement_statements_probe_by_primary_key(svc: BillingService) -> None:
    """The lock and the settle UPDATE find reservations by id, never by walking the
    open-reservations index (quadratic in the number of batches on SQLite) or the
    whole table (what PostgreSQL plans for ``= ANY`` on a fresh table)."""
    [(tenant, key)] = _two_tenants(svc)[:1]
    svc.reserve_many([ReserveRequest(tenant, key, "m", "", 10, 0) for _ in range(50)])
    with svc._session() as s:
        drv = bulk.Driver(s)
        explain = "EXPLAIN " if drv.pg else "EXPLAIN QUERY PLAN "
        plans = []
        for sql in (bulk.LOCK_SQL[drv.pg], bulk.MARK_SETTLED_SQL[drv.pg]):
            with drv.cursor(sql) as cur:
                cur.execute(explain + sql, (drv.ids(["a", "b"]),))
                plans.append("\n".join(str(r[-1]) for r in cur.fetchall()))
    lock = plans[0]
    if drv.pg:
        assert "Index Scan using pk_reservations" in lock, lock
    else:
        for plan in plans:
            assert "sqlite_autoindex_reservations_1 (id=?)" in plan, plan
            assert "ix_reservations_open_expires" not in plan, plan
