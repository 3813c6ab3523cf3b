"""Double-entry journal entries, decided in plain Python.

Accounts: ``tenant:<id>:receivable`` (what the tenant owes; an invoice's total is its
movement in the period), ``revenue`` (usage earned) and ``credits`` (credits
granted). Every entry's postings sum to zero. Nothing is ever updated or deleted: a
mistake is answered with a reversing entry (the original's postings negated) and,
where needed, a new entry.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

REVENUE = "revenue"
CREDITS = "credits"


def receivable(tenant_id: str) -> str:
    return f"tenant:{tenant_id}:receivable"


_rng = random.Random(secrets.randbits(128))
# A forked child must not repeat its parent's sequence.
os.register_at_fork(after_in_child=lambda: _rng.seed(secrets.randbits(128)))


def new_id() -> str:
    """32 hex chars: nanoseconds since the epoch, then 64 random bits. Ids made later
    sort later, so index inserts land at the right edge of the B-tree instead of on
    a random page; the random half keeps ids made in the same nanosecond apart (a
    PRNG seeded from the OS per process: unique, not secret, and no syscall per id)."""
    return f"{time.time_ns():016x}{_rng.getrandbits(64):016x}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal entry and its postings, ready to insert."""

    journal: dict[str, Any]
    postings: list[dict[str, Any]]


def make_entry(
    *,
    ref: str,
    kind: str,
    tenant_id: str,
    period: str,
    memo: str,
    legs: list[tuple[str, int]],
    now: dt.datetime,
    reverses_id: str | None = None,
) -> Entry:
    if sum(amount for _, amount in legs) != 0:
        raise ValueError(f"unbalanced journal entry {ref}: {legs}")  # a bug, never input
    jid = new_id()
    return Entry(
        journal={
            "id": jid,
            "ref": ref,
            "kind": kind,
            "tenant_id": tenant_id,
            "period": period,
            "memo": memo[:500],
            "reverses_id": reverses_id,
            "created_at": now,
        },
        postings=[{"journal_id": jid, "account": a, "amount_micros": m} for a, m in legs],
    )


def usage_entry(
    *, request_id: str, tenant_id: str, period: str, cost: int, now: dt.datetime
) -> Entry:
    return make_entry(
        ref=f"usage:{request_id}",
        kind="usage",
        tenant_id=tenant_id,
        period=period,
        memo=f"usage of request {request_id}",
        legs=[(receivable(tenant_id), cost), (REVENUE, -cost)],
        now=now,
    )


def credit_entry(
    *, ref: str, tenant_id: str, period: str, amount: int, reason: str, now: dt.datetime
) -> Entry:
    return make_entry(
        ref=f"credit:{ref}",
        kind="credit",
        tenant_id=tenant_id,
        period=period,
        memo=reason,
        legs=[(receivable(tenant_id), -amount), (CREDITS, amount)],
        now=now,
    )


def reversal_entry(
    *,
    original_id: str,
    original_ref: str,
    tenant_id: str,
    period: str,
    original_legs: list[tuple[str, int]],
    reason: str,
    now: dt.datetime,
) -> Entry:
    return make_entry(
        ref=f"reversal:{original_ref}",
        kind="reversal",
        tenant_id=tenant_id,
        period=period,
        memo=reason,
        legs=[(a, -m) for a, m in original_legs],
        now=now,
        reverses_id=original_id,
    )
