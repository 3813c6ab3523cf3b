"""Settlement: usage in, exactly one usage event per request out, and one balanced
journal entry per tenant and batch charging the sum of the batch's events.

``settle_batch`` runs inside the caller's transaction and either records the whole
batch or raises with nothing written. Its order of work is what makes it safe under
concurrency on PostgreSQL (and trivially on SQLite, whose IMMEDIATE transactions run
one at a time):

1. lock the batch's reservations (``SELECT ... FOR UPDATE`` in id order);
2. only then read the usage events of the reservations found ``settled``: a
   concurrent settle of the same request id held the lock and has committed by now,
   so its reservation reads settled, its event is seen here, and this delivery
   becomes a duplicate that returns the original result (an event exists exactly
   when its reservation is settled: both are written in one transaction);
3. insert the new events with a plain INSERT (``COPY`` on PostgreSQL): a second
   event for a request id violates UNIQUE(request_id) and fails the whole batch, the
   database's own last line of defence; then one journal entry per tenant with two
   postings (receivable +total, revenue -total), move each budget's hold to spent,
   and mark the reservations settled, all with multi-row statements.

Usage beyond the reservation (more prompt tokens than reserved, more completion
tokens than ``max_completion_tokens``) is refused: the hold would not cover it, and
billing it would let spend pass the cap. The engine caps completion tokens at
``max_tokens``, so this only fires on a caller bug.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.orm import Session

from ember_billing import bulk, ledger, repositories
from ember_billing.bulk import SeenEvent
from ember_billing.ledger import new_id
from ember_billing.models import JournalEntry, Posting
from ember_billing.money import Prices
from ember_billing.records import SettleResult, Usage, period_of
from ember_core.errors import ConflictError, InvalidRequestError, NotFoundError

PriceLookup = Callable[[Session, int], Prices]


def _check_items(items: Sequence[tuple[str, Usage]]) -> None:
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise InvalidRequestError(f"item {i} must be (reservation_id, Usage), got {item!r}")
        rid, usage = item
        if not isinstance(rid, str) or not rid:
            raise InvalidRequestError(
                f"item {i}: reservation id must be a non-empty string, got {rid!r}",
                param="reservation",
            )
        if not isinstance(usage, Usage):
            raise InvalidRequestError(
                f"item {i}: usage must be an ember_billing.Usage, got {type(usage).__name__}",
                param="usage",
            )


def _check_fits(res: Any, usage: Usage) -> None:
    if usage.prompt_tokens > res.prompt_tokens:
        raise InvalidRequestError(
            f"request {res.request_id}: usage reports {usage.prompt_tokens} prompt tokens but "
            f"only {res.prompt_tokens} were reserved; reserve with the real prompt length",
            param="prompt_tokens",
        )
    if usage.completion_tokens > res.max_completion_tokens:
        raise InvalidRequestError(
            f"request {res.request_id}: usage reports {usage.completion_tokens} completion "
            f"tokens, more than its max_completion_tokens ({res.max_completion_tokens}); "
            "the engine must stop at max_tokens",
            param="completion_tokens",
        )


def settle_batch(
    session: Session,
    items: Sequence[tuple[str, Usage]],
    *,
    now: dt.datetime,
    price_of: PriceLookup,
) -> list[SettleResult]:
    _check_items(items)
    drv = bulk.Driver(session)
    wanted = {rid for rid, _ in items}
    locked = bulk.lock_for_settle(drv, list(wanted))
    if len(locked) != len(wanted):
        missing = sorted(wanted - locked.keys())
        raise NotFoundError(
            f"no reservation {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; settle only what reserve() returned",
            param="reservation",
        )
    # An event exists exactly when its reservation is settled: both are written in one
    # transaction, under the reservation's lock. Only those need looking up.
    existing = bulk.events_by_request(
        drv, [r.request_id for r in locked.values() if r.state == "settled"]
    )
    period, day, at = period_of(now), now.date().isoformat(), drv.ts(now)
    results: list[SettleResult] = []
    fresh: dict[str, SettleResult] = {}  # reservation id -> result, this batch
    events: list[tuple[Any, ...]] = []
    entries: dict[str, list[Any]] = {}  # tenant -> [entry id, total, requests]
    moves: dict[int, tuple[int, int]] = {}
    prices: dict[int, Prices] = {}
    for rid, usage in items:
        res = locked[rid]
        seen: SeenEvent | SettleResult | None = fresh.get(rid) or existing.get(res.request_id)
        if seen is not None:
            if (seen.prompt_tokens, seen.cached_tokens, seen.completion_tokens) != (
                usage.prompt_tokens,
                usage.cached_tokens,
                usage.completion_tokens,
            ):
                raise ConflictError(
                    f"request {res.request_id} was already settled with different usage "
                    f"({seen.prompt_tokens} prompt, {seen.cached_tokens} cached, "
                    f"{seen.completion_tokens} completion tokens); a request is billed "
                    "once, so fix the reporter instead of resending",
                    param="usage",
                )
            results.append(
                SettleResult(
                    request_id=seen.request_id,
                    reservation_id=seen.reservation_id,
                    prompt_tokens=seen.prompt_tokens,
                    cached_tokens=seen.cached_tokens,
                    completion_tokens=seen.completion_tokens,
                    cost_micros=seen.cost_micros,
                    duplicate=True,
                )
            )
            continue
        if res.state not in ("open", "expired"):
            raise ConflictError(
                f"reservation {rid} was {res.state} without usage, so nothing can be "
                "settled on it; a request that ran must be settled, not released",
                param="reservation",
            )
        _check_fits(res, usage)
        price = prices.get(res.price_id)
        if price is None:
            price = prices[res.price_id] = price_of(session, res.price_id)
        cost = price.cost(
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
        )
        entry = entries.get(res.tenant_id)
        if entry is None:
            entry = entries[res.tenant_id] = [new_id(), 0, 0]
        entry[1] += cost
        entry[2] += 1
        events.append(
            (
                res.request_id,
                rid,
                entry[0],
                res.tenant_id,
                res.key_id,
                res.model,
                res.adapter,
                res.price_id,
                usage.prompt_tokens,
                usage.cached_tokens,
                usage.completion_tokens,
                cost,
                at,
                period,
                day,
            )
        )
        # An expired reservation's hold was already given back by the sweeper.
        release = res.amount_micros if res.state == "open" else 0
        for bid in (res.tenant_budget_id, res.key_budget_id):
            if bid is not None:
                r0, s0 = moves.get(bid, (0, 0))
                moves[bid] = (r0 + release, s0 + cost)
        result = SettleResult(
            request_id=res.request_id,
            reservation_id=rid,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            cost_micros=cost,
        )
        fresh[rid] = result
        results.append(result)
    if fresh:
        bulk.insert_usage_events(drv, events)
        journals, postings = [], []
        for tenant_id, (entry_id, total, requests) in sorted(entries.items()):
            e = ledger.usage_batch_entry(
                entry_id=entry_id,
                tenant_id=tenant_id,
                period=period,
                total=total,
                requests=requests,
                now=now,
            )
            journals.append(e.journal)
            postings.extend(e.postings)
        repositories.insert_rows(session, JournalEntry, journals)
        repositories.insert_rows(session, Posting, postings)
        repositories.move_budgets(session, moves)
        if bulk.mark_settled(drv, list(fresh)) != len(fresh):
            # impossible while the rows are locked; refuse to guess
            raise ConflictError("reservations changed during settlement; retry the batch")
    return results
