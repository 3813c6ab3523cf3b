"""Settlement: usage in, exactly one usage event and one balanced journal entry out.

``settle_batch`` runs inside the caller's transaction and either records the whole
batch or raises with nothing written. Its order of work is what makes it safe under
concurrency on PostgreSQL (and trivially on SQLite, whose IMMEDIATE transactions run
one at a time):

1. lock the batch's reservations (``SELECT ... FOR UPDATE`` in id order);
2. only then look up which request ids already have a usage event: a concurrent
   settle of the same request id held the lock and has committed by now, so its event
   is seen here and this one becomes a duplicate that returns the original result;
3. insert the new events with ``ON CONFLICT (request_id) DO NOTHING`` (a second line
   of defence: the database itself refuses a second event per request id), their
   journal entries and postings, move each budget's hold to spent, and mark the
   reservations settled, all with multi-row statements.

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

from ember_billing import ledger, repositories
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


def _result_of(event: Any, *, duplicate: bool) -> SettleResult:
    return SettleResult(
        request_id=event.request_id,
        reservation_id=event.reservation_id,
        prompt_tokens=event.prompt_tokens,
        cached_tokens=event.cached_tokens,
        completion_tokens=event.completion_tokens,
        cost_micros=event.cost_micros,
        duplicate=duplicate,
    )


def _same_usage(event: Any, usage: Usage) -> bool:
    return (event.prompt_tokens, event.cached_tokens, event.completion_tokens) == (
        usage.prompt_tokens,
        usage.cached_tokens,
        usage.completion_tokens,
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
    locked = repositories.lock_reservations(session, [rid for rid, _ in items])
    missing = sorted({rid for rid, _ in items} - locked.keys())
    if missing:
        raise NotFoundError(
            f"no reservation {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; settle only what reserve() returned",
            param="reservation",
        )
    existing = repositories.usage_by_request(session, [r.request_id for r in locked.values()])
    period, day = period_of(now), now.date().isoformat()
    results: list[SettleResult] = []
    fresh: dict[str, dict[str, Any]] = {}  # reservation id -> event row, this batch
    journals: list[dict[str, Any]] = []
    postings: list[dict[str, Any]] = []
    moves: dict[int, tuple[int, int]] = {}
    for rid, usage in items:
        res = locked[rid]
        seen = existing.get(res.request_id) or fresh.get(rid)
        if seen is not None:
            seen_row = seen if not isinstance(seen, dict) else _Row(seen)
            if not _same_usage(seen_row, usage):
                raise ConflictError(
                    f"request {res.request_id} was already settled with different usage "
                    f"({seen_row.prompt_tokens} prompt, {seen_row.cached_tokens} cached, "
                    f"{seen_row.completion_tokens} completion tokens); a request is billed "
                    "once, so fix the reporter instead of resending",
                    param="usage",
                )
            results.append(_result_of(seen_row, duplicate=True))
            continue
        if res.state not in ("open", "expired"):
            raise ConflictError(
                f"reservation {rid} was {res.state} without usage, so nothing can be "
                "settled on it; a request that ran must be settled, not released",
                param="reservation",
            )
        _check_fits(res, usage)
        cost = price_of(session, res.price_id).cost(
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
        )
        entry = ledger.usage_entry(
            request_id=res.request_id, tenant_id=res.tenant_id, period=period, cost=cost, now=now
        )
        journals.append(entry.journal)
        postings.extend(entry.postings)
        event = {
            "request_id": res.request_id,
            "reservation_id": rid,
            "journal_id": entry.journal["id"],
            "tenant_id": res.tenant_id,
            "key_id": res.key_id,
            "model": res.model,
            "adapter": res.adapter,
            "price_id": res.price_id,
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_tokens,
            "completion_tokens": usage.completion_tokens,
            "cost_micros": cost,
            "occurred_at": now,
            "period": period,
            "day": day,
        }
        fresh[rid] = event
        # An expired reservation's hold was already given back by the sweeper.
        release = res.amount_micros if res.state == "open" else 0
        for bid in (res.tenant_budget_id, res.key_budget_id):
            if bid is not None:
                r0, s0 = moves.get(bid, (0, 0))
                moves[bid] = (r0 + release, s0 + cost)
        results.append(_result_of(_Row(event), duplicate=False))
    if fresh:
        repositories.insert_usage_events(session, list(fresh.values()))
        repositories.insert_rows(session, JournalEntry, journals)
        repositories.insert_rows(session, Posting, postings)
        repositories.move_budgets(session, moves)
        n = repositories.set_reservation_state(
            session, list(fresh), "settled", only_from=("open", "expired")
        )
        if n != len(fresh):  # impossible while the rows are locked; refuse to guess
            raise ConflictError("reservations changed during settlement; retry the batch")
    return results


class _Row:
    """Attribute access over a dict, so fresh events and stored rows read alike."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:  # pragma: no cover - keeps mypy calm
        raise AttributeError(name)
