"""Exactly once: 10,000 usage events, 30% of them duplicated, in random order, written
by a process that is SIGKILLed at random points and restarted (resending what it had
already committed). The ledger must equal the ground truth to the micro-unit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ember_billing import BillingService, Prices, ReserveRequest
from ember_billing.models import Budget, Reservation, UsageEvent

N_EVENTS = 10_000
DUP_FRACTION = 0.30
KILLS = 6
WRITER = Path(__file__).with_name("_writer.py")


@pytest.mark.slow
def test_ledger_equals_ground_truth_despite_dupes_and_sigkills(
    svc: BillingService, tmp_path: Path
) -> None:
    rng = random.Random(4)
    t = svc.create_tenant("load")
    _, key = svc.create_key("load")
    prices = Prices(input_micros=150_000, cached_input_micros=37_500, output_micros=600_001)
    svc.set_price("m", input_micros=150_000, cached_input_micros=37_500, output_micros=600_001)
    svc.set_quota(t.id, spend_cap_micros=10**15)  # budgets exercised, never binding
    reservations = []
    for lo in range(0, N_EVENTS, 1000):
        reservations += svc.reserve_many(
            [
                ReserveRequest(t.id, key.id, "m", "", rng.randint(1, 4000), rng.randint(1, 1000))
                for _ in range(lo, lo + 1000)
            ]
        )
    truth: dict[str, int] = {}
    events = []
    for r in reservations:
        p = rng.randint(0, r.prompt_tokens)
        k = rng.randint(0, p)
        c = rng.randint(0, r.max_completion_tokens)
        truth[r.request_id] = prices.cost(prompt_tokens=p, cached_tokens=k, completion_tokens=c)
        events.append([r.id, p, c, k])
    events += rng.sample(events, int(N_EVENTS * DUP_FRACTION))
    rng.shuffle(events)
    events_path = tmp_path / "events.jsonl"
    events_path.write_text("\n".join(json.dumps(e) for e in events))
    ckpt = tmp_path / "checkpoint"

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(WRITER), svc.url, str(events_path), str(ckpt)],
            stdout=subprocess.PIPE,
            text=True,
        )

    killed_mid_write = 0
    for _ in range(KILLS):
        proc = start()
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        # Kill after a random number of committed batches (a fixed delay raced a fast
        # writer: on a quiet machine it sometimes finished first); a partly written
        # batch may be in flight at that moment, or not.
        for _ in range(rng.randint(1, 8)):
            if not proc.stdout.readline():
                break  # it finished before this kill
        else:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_write += 1
        proc.wait()
    proc = start()
    assert proc.wait(timeout=300) == 0
    assert killed_mid_write >= KILLS // 2  # the kills really interrupted the writer

    with svc._session() as s:
        rows = dict(s.execute(select(UsageEvent.request_id, UsageEvent.cost_micros)).all())
        n_rows = s.execute(select(func.count(UsageEvent.id))).scalar_one()
        states = dict(
            s.execute(select(Reservation.state, func.count()).group_by(Reservation.state)).all()
        )
        budget = s.scalars(select(Budget)).one()
    assert n_rows == N_EVENTS and rows == truth  # no loss, no duplicate, exact amounts
    total = sum(truth.values())
    totals = svc.ledger_totals()
    assert totals[f"tenant:{t.id}:receivable"] == total and totals["revenue"] == -total
    assert svc.check_ledger() == []  # every entry balances and charges its events exactly
    assert states == {"settled": N_EVENTS}
    assert (budget.spent_micros, budget.reserved_micros) == (total, 0)
    assert svc.invoice(t.id).total_micros == total
