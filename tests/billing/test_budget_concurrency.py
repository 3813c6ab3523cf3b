"""Budgets under concurrency: 64 requests at once against a cap that covers about 10
of them, 100 trials. Spend never passes the cap, holds never pass it either, and once
every request is settled or released no reservation is left open."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from ember_billing import BillingConfig, BillingService, Usage
from ember_billing.models import Budget, Reservation
from ember_core.errors import BudgetExceededError

from .conftest import Clock

CONCURRENCY = 64
TRIALS = int(os.environ.get("EMBER_BUDGET_TRIALS", "100"))
PROMPT, MAX_COMPLETION = 1000, 1000  # hold = 1000 * 1 + 1000 * 2 = 3000 micros


@pytest.fixture
def fast_svc(db_url: str, clock: Clock) -> Iterator[BillingService]:
    # Not durable: skips the fsync per commit only; locking and isolation are as in
    # production, and they are what this test is about. The 64 requests share 16
    # connections, as in a gateway replica: 16 transactions race on the budget row
    # at once (64 connections measured 2x slower on 2 cores, proving nothing more).
    config = BillingConfig(durable=False, pool_size=16, max_overflow=0)
    service = BillingService(db_url, config=config, clock=clock)
    service.set_price(
        "m1", input_micros=1_000_000, cached_input_micros=250_000, output_micros=2_000_000
    )
    yield service
    service.close()


def one_trial(svc: BillingService, trial: int, rng: random.Random) -> tuple[int, int, int]:
    tenant = svc.create_tenant(f"t{trial}")
    _, key = svc.create_key(tenant.id)
    cap = 10 * 3000 + rng.randint(0, 2999)
    svc.set_quota(tenant.id, spend_cap_micros=cap)
    plans = [(rng.random() < 0.25, rng.randint(0, MAX_COMPLETION)) for _ in range(CONCURRENCY)]
    barrier = threading.Barrier(CONCURRENCY)
    admitted: list[int] = []
    errors: list[BaseException] = []

    def request(i: int) -> None:
        try:
            barrier.wait()
            try:
                r = svc.reserve(tenant.id, key.id, "m1", "", PROMPT, MAX_COMPLETION)
            except BudgetExceededError:
                return
            admitted.append(i)
            never_ran, completion = plans[i]
            if never_ran:
                svc.release(r.id)
            else:
                svc.settle(r.id, Usage(prompt_tokens=PROMPT, completion_tokens=completion))
        except BaseException as exc:  # surfaced below, never swallowed
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(CONCURRENCY)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    with svc._session() as s:
        b = s.scalars(select(Budget).where(Budget.tenant_id == tenant.id)).one()
        open_ = s.execute(
            select(func.count())
            .select_from(Reservation)
            .where(Reservation.tenant_id == tenant.id, Reservation.state == "open")
        ).scalar_one()
    billed = sum(u.cost_micros for u in svc.usage(tenant.id))
    assert b.spent_micros == billed <= cap
    assert b.reserved_micros == 0 and open_ == 0
    return cap, billed, len(admitted)


@pytest.mark.slow
def test_spend_never_exceeds_the_cap_under_64_concurrent_requests(
    fast_svc: BillingService,
) -> None:
    rng = random.Random(7)
    admitted = [one_trial(fast_svc, trial, rng)[2] for trial in range(TRIALS)]
    # The cap covers 10 full holds; settles give back unused holds, so a few more fit.
    assert min(admitted) >= 10 and max(admitted) < CONCURRENCY
    assert fast_svc.check_ledger() == []
