"""Double-entry journal entries, decided in plain Python.

Accounts: ``tenant:<id>:receivable`` (what the tenant owes; an invoice's total is its
movement in the period), ``revenue`` (usage earned) and ``credits`` (credits
granted). Every entry's postings sum to zero. Nothing is ever updated or deleted: a
mistake is answered with a reversing entry and, where needed, a new entry.

Usage is journaled per settled batch, not per request: one entry per tenant and
batch, ``receivable +total / revenue -total``, where ``total`` is the sum of the
``cost_micros`` of the batch's usage events of that tenant, each of which points at
the entry (``usage_events.journal_id``). The per-request charge is the event's
``cost_micros``, exact and indexed by request id; ``check_ledger`` proves every
usage entry charges exactly the sum of its events. Reversing one request posts
exactly its cost back.
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
    entry_id: str | None = None,
) -> Entry:
    if sum(amount for _, amount in legs) != 0:
        raise ValueError(f"unbalanced journal entry {ref}: {legs}")  # a bug, never input
    jid = entry_id or new_id()
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


def usage_batch_entry(
    *, entry_id: str, tenant_id: str, period: str, total: int, requests: int, now: dt.datetime
) -> Entry:
    """The one entry of a settled batch for one tenant: ``total`` is the sum of the
    costs of its ``requests`` usage events, which carry ``journal_id == entry_id``."""
    return make_entry(
        ref=f"settlement:{entry_id}",
        kind="usage",
        tenant_id=tenant_id,
        period=period,
        memo=f"usage of {requests} request{'s' if requests != 1 else ''}",
        legs=[(receivable(tenant_id), total), (REVENUE, -total)],
        now=now,
        entry_id=entry_id,
    )


def usage_reversal_entry(
    *,
    request_id: str,
    original_id: str,
    tenant_id: str,
    period: str,
    cost: int,
    reason: str,
    now: dt.datetime,
) -> Entry:
    """Gives back one request's charge (its event's cost), whether its usage was
    journaled alone or in a batch. ``ref`` is per request: reversing twice fails."""
    return make_entry(
        ref=f"reversal:usage:{request_id}",
        kind="reversal",
        tenant_id=tenant_id,
        period=period,
        memo=reason,
        legs=[(receivable(tenant_id), -cost), (REVENUE, cost)],
        now=now,
        reverses_id=original_id,
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
