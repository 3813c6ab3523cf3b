"""BillingService end to end on both backends: reserve, settle, release, idempotency,
cached tokens, early stops, prices over time, expiry, credits and reversals."""

from __future__ import annotations

import datetime as dt

import pytest

from ember_billing import BillingService, Usage
from ember_core.errors import (
    AuthenticationError,
    BudgetExceededError,
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
)

from .conftest import Clock


def test_reserve_settle_bills_exact_cost_and_balances(
    svc: BillingService, world: dict[str, str]
) -> None:
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 500, request_id="req-1")
    # hold = 1000 * 1.00/M + 500 * 2.00/M = 0.001 + 0.001 = 2000 micros
    assert r.amount_micros == 2000 and r.state == "open"
    res = svc.settle(r.id, Usage(prompt_tokens=1000, completion_tokens=100))
    assert res.cost_micros == 1000 + 200 and not res.duplicate
    totals = svc.ledger_totals()
    assert totals[f"tenant:{world['tenant']}:receivable"] == 1200
    assert totals["revenue"] == -1200 and sum(totals.values()) == 0
    assert svc.check_ledger() == []


def test_settle_is_idempotent_by_request_id(svc: BillingService, world: dict[str, str]) -> None:
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 10, 10, request_id="dup")
    first = svc.settle(r, Usage(prompt_tokens=10, completion_tokens=7, cached_tokens=3))
    again = svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=7, cached_tokens=3))
    both = svc.settle_many(
        [
            (r.id, Usage(prompt_tokens=10, completion_tokens=7, cached_tokens=3)),
            (r.id, Usage(prompt_tokens=10, completion_tokens=7, cached_tokens=3)),
        ]
    )
    assert again.duplicate and all(b.duplicate for b in both)
    assert again.cost_micros == first.cost_micros
    assert [u.requests for u in svc.usage(world["tenant"], "2026-12")] == [1]
    with pytest.raises(ConflictError, match="different usage"):
        svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=8, cached_tokens=3))


def test_reserving_a_request_id_twice_returns_the_first(
    svc: BillingService, world: dict[str, str]
) -> None:
    a = svc.reserve(world["tenant"], world["key"], "m1", "", 10, 10, request_id="same")
    b = svc.reserve(world["tenant"], world["key"], "m1", "", 10, 10, request_id="same")
    assert a.id == b.id


def test_cached_tokens_are_a_subset_priced_once_at_the_cached_rate(
    svc: BillingService, world: dict[str, str]
) -> None:
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 1_000_000, 0)
    res = svc.settle(
        r.id, Usage(prompt_tokens=1_000_000, completion_tokens=0, cached_tokens=600_000)
    )
    # 400k uncached at 1.00/M + 600k cached at 0.25/M = 0.40 + 0.15
    assert res.cost_micros == 400_000 + 150_000
    with pytest.raises(InvalidRequestError, match="subset"):
        Usage(prompt_tokens=5, completion_tokens=0, cached_tokens=6)


def test_rounding_is_half_up_once_per_event(svc: BillingService, world: dict[str, str]) -> None:
    # 1 prompt token at 1.00/M = 1 micro; 1 output token at 2.00/M = 2 micros: exact.
    # 1 cached token at 0.25/M = 0.25 micros alone rounds to 0; 2 cached = 0.5 -> 1.
    r1 = svc.reserve(world["tenant"], world["key"], "m1", "", 1, 0)
    r2 = svc.reserve(world["tenant"], world["key"], "m1", "", 2, 0)
    assert (
        svc.settle(r1.id, Usage(prompt_tokens=1, completion_tokens=0, cached_tokens=1)).cost_micros
        == 0
    )
    assert (
        svc.settle(r2.id, Usage(prompt_tokens=2, completion_tokens=0, cached_tokens=2)).cost_micros
        == 1
    )


@pytest.mark.parametrize("k", [0, 1, 37, 500])
def test_stream_cut_after_k_tokens_is_billed_k(
    svc: BillingService, world: dict[str, str], k: int
) -> None:
    r = svc.reserve(world["tenant"], world["key"], "m1", "ad1", 100, 500)
    res = svc.settle(r.id, Usage(prompt_tokens=100, completion_tokens=k))
    assert res.completion_tokens == k
    assert res.cost_micros == 100 * 2 + k * 4  # adapter prices, micro-units per token
    [row] = svc.usage(world["tenant"], "2026-12", group_by=("adapter",))
    assert row.completion_tokens == k and row.adapter == "ad1"


def test_usage_beyond_the_reservation_is_refused(
    svc: BillingService, world: dict[str, str]
) -> None:
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 10, 5)
    with pytest.raises(InvalidRequestError, match="max_completion_tokens"):
        svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=6))
    with pytest.raises(InvalidRequestError, match="prompt tokens"):
        svc.settle(r.id, Usage(prompt_tokens=11, completion_tokens=5))
    assert svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=5)).cost_micros == 20


def test_release_then_settle_is_a_conflict_and_changes_nothing(
    svc: BillingService, world: dict[str, str]
) -> None:
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 10, 5)
    assert svc.release(r.id).state == "released"
    assert svc.release(r.id).state == "released"  # twice is a no-op
    before = svc.ledger_totals()
    with pytest.raises(ConflictError, match="released"):
        svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=5))
    assert svc.ledger_totals() == before
    r2 = svc.reserve(world["tenant"], world["key"], "m1", "", 10, 5)
    svc.settle(r2.id, Usage(prompt_tokens=10, completion_tokens=5))
    with pytest.raises(ConflictError, match="settled"):
        svc.release(r2.id)


def test_price_change_never_rewrites_history(
    svc: BillingService, world: dict[str, str], clock: Clock
) -> None:
    r_old = svc.reserve(world["tenant"], world["key"], "m1", "", 1_000_000, 0)
    clock.advance(seconds=1)
    svc.set_price("m1", input_micros=3_000_000, cached_input_micros=0, output_micros=0)
    r_new = svc.reserve(world["tenant"], world["key"], "m1", "", 1_000_000, 0)
    # The request reserved before the change keeps its price, even settled after it.
    assert (
        svc.settle(r_old.id, Usage(prompt_tokens=1_000_000, completion_tokens=0)).cost_micros
        == 1_000_000
    )
    assert (
        svc.settle(r_new.id, Usage(prompt_tokens=1_000_000, completion_tokens=0)).cost_micros
        == 3_000_000
    )
    future = clock.now + dt.timedelta(days=1)
    svc.set_price(
        "m1", input_micros=9, cached_input_micros=9, output_micros=9, effective_from=future
    )
    assert svc.reserve(world["tenant"], world["key"], "m1", "", 1_000_000, 0).amount_micros == (
        3_000_000
    )


def test_unsettled_reservations_expire_and_give_their_hold_back(
    svc: BillingService, world: dict[str, str], clock: Clock
) -> None:
    svc.set_quota(world["tenant"], spend_cap_micros=3000)
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 1000)  # holds 3000
    assert svc.sweep_expired() == 0
    clock.advance(seconds=svc.config.reservation_ttl_s + 1)
    assert svc.sweep_expired() == 1
    r2 = svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 1000)  # fits again
    svc.release(r2.id)
    # A late report of a request that did run is still billed, once.
    assert svc.settle(r.id, Usage(prompt_tokens=1000, completion_tokens=10)).cost_micros == 1020
    assert svc.settle(r.id, Usage(prompt_tokens=1000, completion_tokens=10)).duplicate


def test_credit_and_reversal_are_new_entries(
    svc: BillingService, world: dict[str, str], clock: Clock
) -> None:
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 1000, 0, request_id="to-reverse")
    svc.settle(r.id, Usage(prompt_tokens=1000, completion_tokens=0))
    clock.advance(seconds=1)
    svc.credit(world["tenant"], 300, reason="goodwill", ref="c-1")
    with pytest.raises(ConflictError):
        svc.credit(world["tenant"], 300, reason="goodwill", ref="c-1")
    clock.advance(seconds=1)
    svc.reverse_usage("to-reverse", reason="outage")
    with pytest.raises(ConflictError, match="already reversed"):
        svc.reverse_usage("to-reverse", reason="outage")
    inv = svc.invoice(world["tenant"], "2026-12")
    assert inv.total_micros == 1000 - 300 - 1000 and not inv.final
    assert [ln.amount_micros for ln in inv.lines] == [1000, -300, -1000]
    assert svc.check_ledger() == [] and sum(svc.ledger_totals().values()) == 0


def test_invoice_of_a_closed_period_is_stored_once(
    svc: BillingService, world: dict[str, str], clock: Clock
) -> None:
    r = svc.reserve(world["tenant"], world["key"], "m1", "ad1", 10, 10)
    svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=10))
    r = svc.reserve(world["tenant"], world["key"], "m1", "", 10, 10)
    svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=10))
    clock.now = dt.datetime(2027, 1, 2)
    inv = svc.invoice("acme", "2026-12")
    assert inv.final and inv.total_micros == 60 + 30
    assert [(ln.model, ln.adapter) for ln in inv.lines] == [("m1", ""), ("m1", "ad1")]
    svc.credit("acme", 5, reason="late", ref="late-1")  # lands in January, not December
    assert svc.invoice("acme", "2026-12") == inv
    assert svc.invoice("acme", "2027-01").total_micros == -5


def test_usage_groups(svc: BillingService, world: dict[str, str], clock: Clock) -> None:
    _, key2 = svc.create_key("acme", name="second")
    for key, adapter in ((world["key"], ""), (key2.id, "ad1"), (key2.id, "ad1")):
        r = svc.reserve(world["tenant"], key, "m1", adapter, 10, 10)
        svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=4))
        clock.advance(days=1)
    rows = svc.usage("acme", "2026-12", group_by=("key", "adapter"))
    assert {(r.key, r.adapter, r.requests) for r in rows} == {
        (world["key"], "", 1),
        (key2.id, "ad1", 2),
    }
    assert len(svc.usage("acme", "2026-12", group_by=("day",))) == 3
    assert svc.usage("acme", "2026-11") == []
    with pytest.raises(InvalidRequestError, match="group"):
        svc.usage("acme", "2026-12", group_by=("colour",))
    with pytest.raises(NotFoundError):
        svc.usage("nobody", "2026-12")


def test_tenants_are_isolated(svc: BillingService, world: dict[str, str]) -> None:
    other = svc.create_tenant("globex")
    _, other_key = svc.create_key("globex")
    with pytest.raises(AuthenticationError, match="does not belong"):
        svc.reserve(other.id, world["key"], "m1", "", 10, 10)
    r = svc.reserve(other.id, other_key.id, "m1", "", 10, 10)
    svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=10))
    assert svc.usage("acme", "2026-12") == []
    assert svc.invoice("acme", "2026-12").total_micros == 0
    assert svc.invoice("globex", "2026-12").total_micros == 30
    assert svc.authenticate(world["plaintext"]) == (world["tenant"], world["key"])


def test_reserve_many_is_all_or_nothing(svc: BillingService, world: dict[str, str]) -> None:
    from ember_billing import ReserveRequest

    svc.set_quota(world["tenant"], spend_cap_micros=5000)
    ok = ReserveRequest(world["tenant"], world["key"], "m1", "", 1000, 1000)  # 3000
    with pytest.raises(BudgetExceededError):
        svc.reserve_many([ok, ok])
    with pytest.raises(ModelNotFoundError):
        svc.reserve_many([ok, ReserveRequest(world["tenant"], world["key"], "nope", "", 1, 1)])
    [r] = svc.reserve_many([ok])  # nothing of the refused batches was held
    assert r.amount_micros == 3000


def test_invoice_adds_up_while_settlements_commit(
    svc: BillingService, world: dict[str, str]
) -> None:
    import threading

    from ember_billing import ReserveRequest

    reservations = svc.reserve_many(
        [ReserveRequest(world["tenant"], world["key"], "m1", "", 10, 10) for _ in range(150)]
    )
    done = threading.Event()

    def settle_all() -> None:
        for r in reservations:
            svc.settle(r.id, Usage(prompt_tokens=10, completion_tokens=10))
        done.set()

    th = threading.Thread(target=settle_all)
    th.start()
    totals = []
    while not done.is_set():  # each invoice checks lines against the ledger
        totals.append(svc.invoice(world["tenant"], "2026-12").total_micros)
    th.join()
    assert totals == sorted(totals) and svc.invoice("acme", "2026-12").total_micros == 150 * 30
