"""Spend caps and rate limits at reserve time.

A quota (tenant-wide, or one key) has a monthly spend cap and/or a tokens-per-minute
limit. Each cap has one ``budgets`` row per month holding ``spent`` and ``reserved``;
each limit one ``rate_windows`` row per UTC minute. Admission is a conditional UPDATE
(or upsert) whose row count decides, never a read followed by a write, and it is the
last thing ``reserve`` does before commit: these rows are what every request of a
tenant contends for, and they stay locked only for that final round trip.
"""

from __future__ import annotations

import datetime as dt
import math

from sqlalchemy.orm import Session

from ember_billing import repositories
from ember_billing.money import format_micros
from ember_core.errors import BudgetExceededError, RateLimitError

Limits = dict[tuple[str, str], tuple[int | None, int | None]]


def limits(s: Session, holds: dict[tuple[str, str], int], period: str) -> Limits:
    """``{scope: (budget_id or None, tokens_per_minute or None)}`` for scopes with
    limits; budget rows of this period are made on first use.

    A budget already too short when read refuses at once, without queueing for its
    row lock: a refusal may be a moment stale (a release could be committing), an
    admission never is, since admitting is the conditional UPDATE in ``take``."""
    out: Limits = {}
    for t in sorted({t for t, _ in holds}):
        keys = [k for tt, k in holds if tt == t and k]
        for key_id, cap, tpm, bid, left in repositories.limits_for(s, t, keys, period):
            if cap is not None and bid is None:
                bid = repositories.ensure_budget(s, t, key_id, period, cap)
            elif cap is not None and left is not None and left < holds[(t, key_id)]:
                _refuse(holds[(t, key_id)], max(0, left), key_id, period)
            out[(t, key_id)] = (bid if cap is not None else None, tpm)
    return out


def _refuse(amount: int, left: int, key_id: str, period: str) -> None:
    what = "tenant" if not key_id else f"key {key_id}"
    raise BudgetExceededError(
        f"this request could cost up to {format_micros(amount)} but the "
        f"{what}'s spend cap for {period} has {format_micros(left)} left; "
        "lower max_tokens, or raise the cap (`ember tenants set-quota`)",
        remaining_micros=left,
    )


def take(
    s: Session,
    limits: Limits,
    holds: dict[tuple[str, str], int],
    tokens: dict[tuple[str, str], int],
    now: dt.datetime,
    period: str,
) -> None:
    """Takes tokens from every rate window and holds from every budget involved, or
    raises (the transaction rolls back). Last in the transaction on purpose: these
    are the rows every request of a tenant contends for, locked until commit."""
    minute = int(now.replace(tzinfo=dt.UTC).timestamp()) // 60
    for scope, n in sorted(tokens.items()):
        tpm = limits.get(scope, (None, None))[1]
        if tpm is not None and not repositories.take_rate_tokens(
            s, f"{scope[0]}:{scope[1]}", minute, n, tpm
        ):
            wait = 60 - now.second - now.microsecond / 1e6
            raise RateLimitError(
                f"{n} tokens (prompt + max_tokens) would pass the limit of "
                f"{tpm} tokens per minute; retry in {math.ceil(wait)} s "
                "or lower max_tokens",
                retry_after_s=wait,
            )
    caps = sorted((bid, scope) for scope, (bid, _) in limits.items() if bid is not None)
    for bid, scope in caps:  # id order: concurrent holds lock alike, no deadlock
        if not repositories.hold_budget(s, bid, holds[scope]):
            left = repositories.budget_remaining(s, bid)
            _refuse(holds[scope], left, scope[1], period)
